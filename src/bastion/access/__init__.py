"""Access control: Cedar policy-as-code, deny by default.

``schema.cedarschema`` declares the entities and actions; ``policies/*.cedar``
say who may do what. :class:`Authorizer` validates both at start-up and answers
``authorize(subject, action, resource)``.
"""

from bastion.access.authorize import (
    ACTIONS,
    ADMIN_ACTIONS,
    ADMIN_ROLES,
    ROLES,
    Authorizer,
    PolicyError,
    Resource,
    Subject,
)

__all__ = [
    "ACTIONS",
    "ADMIN_ACTIONS",
    "ADMIN_ROLES",
    "ROLES",
    "Authorizer",
    "PolicyError",
    "Resource",
    "Subject",
]
