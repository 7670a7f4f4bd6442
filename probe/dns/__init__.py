"""DNS: transports (udp, tcp, dot, doh, system), lookups, and the integrity judge with its verdicts.

Layering inside: data, transport, system -> lookup -> checks, dnssec -> judge -> verdicts.
"""
