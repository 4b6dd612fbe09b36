"""Identity: the built-in OIDC provider, tokens, DPoP, passwords and MFA."""
