"""A script's side of the provider: the authorization code flow with PKCE and
a DPoP key, as ``bastion login``, the demo and the tests run it.

It speaks plain HTTP to the running api, exactly as a browser plus a public
client would (RFC 8252: a native app with a loopback redirect URI).
:class:`DpopAuth` signs a DPoP proof for every request and follows the
server-nonce exchange of RFC 9449 sections 8 and 9; any httpx-based client
(Authlib's included) can use it.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Generator
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import httpx

from bastion.identity.dpop import DpopKey
from bastion.identity.service import CLI_CLIENT_ID, CLI_REDIRECT_URI, s256


class LoginFailed(Exception):
    """The provider refused the login; the message says what it answered."""


class DpopAuth(httpx.Auth):
    """An httpx authentication flow: a fresh DPoP proof on every request (RFC
    9449 section 4), ``Authorization: DPoP`` when an access token is given
    (section 7.1), and the server-nonce exchange (sections 8 and 9).

    A ``use_dpop_nonce`` answer (400 from an authorization server, 401 from a
    resource server) with a ``DPoP-Nonce`` header is retried once with a new
    proof that echoes it; the latest nonce any answer carried is kept in
    :attr:`nonce` for the next request.
    """

    requires_response_body = True  # the 400's error code is in its JSON body

    def __init__(
        self, key: DpopKey, *, access_token: str | None = None, nonce: str | None = None
    ) -> None:
        self.key = key
        self.access_token = access_token
        self.nonce = nonce

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        self._sign(request)
        response = yield request
        offered = response.headers.get("dpop-nonce")
        if offered is None:
            return
        asked = _asks_for_nonce(response)
        self.nonce = offered
        if asked:
            self._sign(request)  # a new proof: new jti and iat, the nonce echoed
            response = yield request
            self.nonce = response.headers.get("dpop-nonce", self.nonce)

    def _sign(self, request: httpx.Request) -> None:
        request.headers["DPoP"] = self.key.proof(  # htu drops query and fragment
            request.method, str(request.url), access_token=self.access_token, nonce=self.nonce
        )
        if self.access_token is not None:
            request.headers["Authorization"] = f"DPoP {self.access_token}"


def _asks_for_nonce(response: httpx.Response) -> bool:
    """Whether ``response`` is RFC 9449's "use_dpop_nonce" (section 8 or 9)."""
    if response.status_code == 401:
        return 'error="use_dpop_nonce"' in response.headers.get("www-authenticate", "")
    if response.status_code != 400:
        return False
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("error") == "use_dpop_nonce"


@dataclass
class TokenSet:
    """A DPoP-bound token pair, the private key it is bound to, and the last
    DPoP nonce the provider gave (None: it asked for none)."""

    access_token: str
    refresh_token: str
    expires_in: int
    key: DpopKey
    nonce: str | None = None

    def headers(self, method: str, url: str, *, nonce: str | None = None) -> dict[str, str]:
        """Return the Authorization and DPoP headers for one request (the proof
        echoes ``nonce`` when a resource server asked for one)."""
        return {
            "Authorization": f"DPoP {self.access_token}",
            "DPoP": self.key.proof(method, url, access_token=self.access_token, nonce=nonce),
        }

    def auth(self) -> DpopAuth:
        """An httpx auth flow for resource requests with these tokens."""
        return DpopAuth(self.key, access_token=self.access_token)


async def login(
    http: httpx.AsyncClient,
    base_url: str,
    *,
    tenant: str,
    email: str,
    password: str,
    totp: str | None = None,
    client_id: str = CLI_CLIENT_ID,
    redirect_uri: str = CLI_REDIRECT_URI,
    key: DpopKey | None = None,
) -> TokenSet:
    """Run the code flow with PKCE S256 and return DPoP-bound tokens.

    Raises :class:`LoginFailed` with the provider's answer when it refuses.
    """
    key = key or DpopKey.generate()
    verifier = secrets.token_urlsafe(48)
    state = secrets.token_urlsafe(16)
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "scope": "openid",
        "state": state,
        "code_challenge": s256(verifier),
        "code_challenge_method": "S256",
        "tenant": tenant,
    }
    page = await http.get(f"{base_url}/authorize", params=params)
    if page.status_code != 200:
        raise LoginFailed(f"authorize answered {page.status_code}")
    answer = await http.post(
        f"{base_url}/authorize", data={**params, "email": email, "password": password}
    )
    if answer.status_code == 200 and "name=ticket" in answer.text:
        if totp is None:
            raise LoginFailed("a TOTP code is required for this account")
        ticket = re.search(r'name=ticket value="([^"]+)"', answer.text)
        assert ticket is not None
        answer = await http.post(
            f"{base_url}/authorize/mfa", data={"ticket": ticket.group(1), "code": totp}
        )
    if answer.status_code != 303:
        raise LoginFailed(f"sign-in answered {answer.status_code}")
    location = urlsplit(answer.headers["location"])
    query = {k: v[0] for k, v in parse_qs(location.query).items()}
    if query.get("state") != state or query.get("iss") != base_url or "code" not in query:
        raise LoginFailed(f"bad redirect: {query.get('error', 'state or issuer mismatch')}")
    return await _token(
        http,
        base_url,
        key,
        {
            "grant_type": "authorization_code",
            "code": query["code"],
            "client_id": client_id,
            "redirect_uri": redirect_uri,
            "code_verifier": verifier,
        },
    )


async def refresh(
    http: httpx.AsyncClient, base_url: str, tokens: TokenSet, client_id: str = CLI_CLIENT_ID
) -> TokenSet:
    """Rotate ``tokens`` with the refresh grant; return the new pair."""
    return await _token(
        http,
        base_url,
        tokens.key,
        {
            "grant_type": "refresh_token",
            "refresh_token": tokens.refresh_token,
            "client_id": client_id,
        },
        nonce=tokens.nonce,
    )


async def _token(
    http: httpx.AsyncClient,
    base_url: str,
    key: DpopKey,
    form: dict[str, str],
    *,
    nonce: str | None = None,
) -> TokenSet:
    auth = DpopAuth(key, nonce=nonce)
    answer = await http.post(f"{base_url}/token", data=form, auth=auth)
    if answer.status_code != 200:
        raise LoginFailed(f"token endpoint: {answer.json().get('error', answer.status_code)}")
    body = answer.json()
    if body.get("token_type") != "DPoP":
        raise LoginFailed("the provider did not bind the token to the DPoP key")
    return TokenSet(
        body["access_token"], body["refresh_token"], body["expires_in"], key, auth.nonce
    )
