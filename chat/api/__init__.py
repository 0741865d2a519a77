"""The REST API under ``/api/`` (Django REST framework, drf-spectacular, django-filter).

See docs/api.md for the endpoint list; the schema is served at ``/api/schema/``.
"""
