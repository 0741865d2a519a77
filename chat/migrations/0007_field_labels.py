"""Labels people read in the admin (verbose names with their units), and a help text
for ``reasoning_hidden`` that holds whether it is set or not. No schema change."""

from decimal import Decimal

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('chat', '0006_message_reservation'),
    ]

    operations = [
        migrations.AlterField(
            model_name='usagerecord',
            name='reasoning_hidden',
            field=models.BooleanField(default=False, help_text='Whether the provider billed reasoning it did not stream; if so, counts it did not report undercount it.'),
        ),
        migrations.AlterField(
            model_name='usagerecord',
            name='input_price_per_mtok',
            field=models.DecimalField(decimal_places=6, default=0, max_digits=12, verbose_name='input price (USD per 1M tokens)'),
        ),
        migrations.AlterField(
            model_name='usagerecord',
            name='output_price_per_mtok',
            field=models.DecimalField(decimal_places=6, default=0, max_digits=12, verbose_name='output price (USD per 1M tokens)'),
        ),
        migrations.AlterField(
            model_name='usagerecord',
            name='cached_input_price_per_mtok',
            field=models.DecimalField(blank=True, decimal_places=6, max_digits=12, null=True, verbose_name='cached input price (USD per 1M tokens)'),
        ),
        migrations.AlterField(
            model_name='usagerecord',
            name='cost_usd',
            field=models.DecimalField(decimal_places=8, default=0, max_digits=14, verbose_name='cost (USD)'),
        ),
        migrations.AlterField(
            model_name='usagerecord',
            name='ttft_ms',
            field=models.PositiveIntegerField(blank=True, null=True, verbose_name='time to first token (ms)'),
        ),
        migrations.AlterField(
            model_name='usagerecord',
            name='duration_ms',
            field=models.PositiveIntegerField(default=0, verbose_name='duration (ms)'),
        ),
        migrations.AlterField(
            model_name='modelprice',
            name='input_per_mtok',
            field=models.DecimalField(decimal_places=6, default=Decimal('0'), help_text='USD per 1M input (prompt) tokens', max_digits=12, verbose_name='input price (USD per 1M tokens)'),
        ),
        migrations.AlterField(
            model_name='modelprice',
            name='output_per_mtok',
            field=models.DecimalField(decimal_places=6, default=Decimal('0'), help_text='USD per 1M output (completion) tokens', max_digits=12, verbose_name='output price (USD per 1M tokens)'),
        ),
        migrations.AlterField(
            model_name='modelprice',
            name='cached_input_per_mtok',
            field=models.DecimalField(blank=True, decimal_places=6, help_text='USD per 1M cached input tokens; empty: the input price', max_digits=12, null=True, verbose_name='cached input price (USD per 1M tokens)'),
        ),
    ]
