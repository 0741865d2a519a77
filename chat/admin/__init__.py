"""Django admin: usage review (read-only audit trail, totals, CSV, report), conversations
with their transcript (chat.admin.records), model prices and per-user budgets
(chat.admin.limits). Importing this package registers them all.

Staff need the ``view`` permission of a model to see its pages (superusers have all);
the usage export and report need ``chat.view_usagerecord``.
"""

from . import limits, records

__all__ = ["limits", "records"]
