"""Read the SNI of a QUIC Initial as an on-path censor does: decrypt it with keys anyone can derive.

QUIC Initial packets are encrypted with keys derived from the client's Destination
Connection ID, which travels in clear (RFC 9001 5.2), so any observer can decrypt them and
read the ClientHello in their CRYPTO frames. The Great Firewall does this since 2024-04-07
(Zohaib et al., USENIX Security 2025). The demo's border and the interference lab use this to
filter QUIC by name as it does; aioquic derives the keys and parses the ClientHello.
"""

from __future__ import annotations

from aioquic.buffer import Buffer, BufferReadError
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import QuicPacketType, QuicProtocolVersion, pull_quic_header
from aioquic.tls import AlertDecodeError, pull_client_hello

_PADDING, _PING, _CRYPTO = 0x00, 0x01, 0x06
_VERSIONS = (QuicProtocolVersion.VERSION_1, QuicProtocolVersion.VERSION_2)


def initial_sni(datagram: bytes) -> str | None:
    """Return the SNI of the ClientHello in a client's first Initial datagram, None if it carries none.

    Only a ClientHello that fits in the datagram's first packet is read (a client's first
    Initial of up to ~1,150 bytes of handshake, as aioquic, curl and most browsers send).
    """
    try:
        buf = Buffer(data=datagram)
        header = pull_quic_header(buf, host_cid_length=8)
        if header.packet_type is not QuicPacketType.INITIAL or header.version not in _VERSIONS:
            return None
        crypto = CryptoPair()
        crypto.setup_initial(header.destination_cid, is_client=False, version=header.version)
        _, payload, _ = crypto.decrypt_packet(datagram[: header.packet_length], buf.tell(), 0)
        hello = _crypto_stream(payload)
        if hello is None:
            return None
        name = pull_client_hello(Buffer(data=hello)).server_name
        return name
    except (ValueError, BufferReadError, AlertDecodeError):  # CryptoError is a ValueError
        return None


def _crypto_stream(payload: bytes) -> bytes | None:
    """Return the CRYPTO stream from offset 0 as far as it is contiguous, if it holds a whole handshake message."""
    buf = Buffer(data=payload)
    pieces: dict[int, bytes] = {}
    while not buf.eof():
        frame = buf.pull_uint_var()
        if frame in (_PADDING, _PING):
            continue
        if frame != _CRYPTO:
            break  # an ACK or other frame: a first Initial carries none before its ClientHello
        offset, length = buf.pull_uint_var(), buf.pull_uint_var()
        pieces[offset] = buf.pull_bytes(length)
    stream, at = b"", 0
    while at in pieces:
        stream += pieces[at]
        at += len(pieces[at])
    if len(stream) < 4 or len(stream) < 4 + int.from_bytes(stream[1:4], "big"):
        return None
    return stream
