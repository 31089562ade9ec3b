"""The token service: signing keys, minting, token exchange (RFC 8693), OAuth endpoints.

Kept free of imports on purpose: `idgate.config` imports `idgate.sts.settings`,
and importing anything else here would import `idgate.config` back while it is
still loading. The wiring is `idgate.sts.service.build_sts`.
"""
