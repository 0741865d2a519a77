"""Where a streaming answer can be continued by another worker (the Responses API in
background mode): its response id and last sequence number, saved with each
checkpoint, and the hand-over mark of a worker that went away mid-answer."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('chat', '0007_field_labels'),
    ]

    operations = [
        migrations.AddField(
            model_name='message',
            name='response_id',
            field=models.CharField(blank=True, default='', max_length=100),
        ),
        migrations.AddField(
            model_name='message',
            name='response_sequence',
            field=models.IntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='message',
            name='handover',
            field=models.JSONField(blank=True, null=True),
        ),
    ]
