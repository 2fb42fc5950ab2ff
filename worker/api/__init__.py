"""The HTTP APIs beside inference: the operator's `/admin/*`, `/capacity`, the router's `/openrouter/models`, and
the key holder's `/v1/key` and `/v1/usage`; their admin auth and wire shapes. Billing, capacity, economics and
the registry behind them know nothing of HTTP.
"""

from worker.api.admin_auth import AdminAccess, AdminChange, ChangeRecorder
from worker.api.billing import audit_recorder, build_admin_router, build_key_router
from worker.api.capacity import build_capacity_router
from worker.api.economics import build_economics_router
from worker.api.listing import OPENROUTER_V24_PATH, build_listing_router

__all__ = [
    "OPENROUTER_V24_PATH",
    "AdminAccess",
    "AdminChange",
    "ChangeRecorder",
    "audit_recorder",
    "build_admin_router",
    "build_capacity_router",
    "build_economics_router",
    "build_key_router",
    "build_listing_router",
]
