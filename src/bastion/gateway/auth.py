"""Who may call the gateway: a user with a Bastion token and DPoP proof, or the
api with an envelope it signed on a user's behalf — either way Cedar decides
``model:invoke`` for that user, with their roles as they are now."""

from __future__ import annotations

from fastapi import Request

from bastion.access.authorize import Resource, Subject
from bastion.access.guard import Forbidden, Guard
from bastion.api.openapi import DPOP_REQUIREMENT, ENVELOPE
from bastion.api.problems import Problem, problem_type
from bastion.gateway.service import Caller
from bastion.safety.signing import HEADER, EnvelopeInvalid, EnvelopeSigner

ACTION = "model:invoke"
# What an envelope may say the user is doing: invoking a model directly, or
# asking a question the api answers with a model (checked again here).
ENVELOPE_ACTIONS = {"model:invoke": "Model", "question:ask": "Question"}


class EnvelopeRefused(Problem):
    type = problem_type("envelope-refused")
    title = "The signed envelope was refused"
    status = 401


class GatewayAuth:
    """The routes' dependency; ``bastion_action`` declares the action (R1)."""

    bastion_action = ACTION
    resource_type = "Model"

    def __init__(
        self, guard: Guard, signer: EnvelopeSigner | None, *, envelope_from: str | None = None
    ) -> None:
        self.guard = guard
        self.signer = signer
        # With mTLS between the processes, the envelope is the api's message
        # signature on top of the api's certificate: accepted only on a
        # connection whose peer the internal listener's gate admitted as
        # ``envelope_from`` (issue 18), never from whoever holds a copy.
        self.envelope_from = envelope_from
        self.token = guard(ACTION, "Model")
        # What the OpenAPI document says this dependency accepts (either one).
        self.openapi_security = DPOP_REQUIREMENT + ([{ENVELOPE: []}] if signer else [])

    async def __call__(self, request: Request) -> Caller:
        header = request.headers.get(HEADER)
        if header is None or self.signer is None:
            principal = await self.token(request)
            return Caller(principal.tenant_id, principal.user_id, frozenset(principal.roles))
        if (
            self.envelope_from is not None
            and request.scope.get("state", {}).get("workload_id") != self.envelope_from
        ):
            raise EnvelopeRefused(
                "an envelope is accepted only over mTLS from the api", reason="not-from-api"
            )
        try:
            envelope = self.signer.verify(header, await request.body())
        except EnvelopeInvalid as refused:
            raise EnvelopeRefused(
                "the request's envelope does not verify", reason=refused.reason
            ) from None
        # verify() used the nonce up in this process's memory; with several
        # gateway processes (replay_store "postgres") also across all of them.
        shared = self.guard.authenticator.replay_store
        expires_at = envelope.issued_at + self.signer.tokens.max_age
        if shared is not None and not await shared.first_use(
            "envelope", envelope.nonce, expires_at
        ):
            raise EnvelopeRefused("the request's envelope does not verify", reason="replayed")
        resource_type = ENVELOPE_ACTIONS.get(envelope.action)
        if resource_type is None:
            raise EnvelopeRefused("the envelope names no model action", reason="bad-action")
        roles = await self.guard.member_roles(envelope.tenant_id, envelope.user_id)
        subject = Subject(envelope.user_id, envelope.tenant_id, roles, mfa=False)
        resource = Resource(resource_type, "gateway", envelope.tenant_id)
        if not roles or not self.guard.authorizer.authorize(subject, envelope.action, resource):
            raise Forbidden(f"the user the envelope names may not do {envelope.action}")
        workload = request.scope.get("state", {}).get("workload_id")
        return Caller(envelope.tenant_id, envelope.user_id, roles, workload)
