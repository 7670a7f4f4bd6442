"""`probe demo`: a border on loopback (middlebox, DNS, proxies) that shows every outcome."""
