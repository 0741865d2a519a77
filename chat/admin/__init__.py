"""Django admin: usage review (read-only audit trail, totals, CSV, report), conversations
with their transcript (chat.admin.records), model prices and per-user budgets
(chat.admin.limits). Importing this package registers them all.

Staff need the ``view`` permission of a model to see its pages (superusers have all);
the usage export and report need ``chat.view_usagerecord``.
"""

from django.contrib import admin

from . import limits, records

# The names on every admin page (Django's defaults say "Django administration").
admin.site.site_header = "Chat administration"
admin.site.site_title = "Chat admin"
admin.site.index_title = "Usage, conversations and limits"

__all__ = ["limits", "records"]
