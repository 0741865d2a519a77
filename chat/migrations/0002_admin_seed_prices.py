"""Seed ModelPrice from settings.CHAT_MODEL_PRICES, once.

A data migration rather than a post_migrate handler: the table is the source of truth
once it exists (staff edit it in the admin), so it is filled exactly once, when the
table is new, and a later `migrate` never re-adds rows an admin deleted or changed.
Rows already present for a model name are left alone.
"""

import datetime as dt

from django.conf import settings
from django.db import migrations

# Seeded prices apply to all history: earlier than any usage record.
SEED_VALID_FROM = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)


def seed_prices(apps, schema_editor):
    ModelPrice = apps.get_model("chat", "ModelPrice")
    existing = set(ModelPrice.objects.values_list("model", flat=True))
    ModelPrice.objects.bulk_create(
        ModelPrice(
            model=name,
            input_per_mtok=prices[0],
            output_per_mtok=prices[1],
            valid_from=SEED_VALID_FROM,
        )
        for name, prices in settings.CHAT_MODEL_PRICES.items()
        if name not in existing
    )


def unseed_prices(apps, schema_editor):
    ModelPrice = apps.get_model("chat", "ModelPrice")
    ModelPrice.objects.filter(valid_from=SEED_VALID_FROM).delete()


class Migration(migrations.Migration):
    dependencies = [("chat", "0001_initial")]

    operations = [migrations.RunPython(seed_prices, unseed_prices)]
