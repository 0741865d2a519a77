"""Static files storage of a deployment (``DEBUG=0``; collectstatic fills STATIC_ROOT)."""

from whitenoise.storage import CompressedManifestStaticFilesStorage


class StaticStorage(CompressedManifestStaticFilesStorage):
    """whitenoise's compressed storage with hashed names, which also rewrites the relative
    imports of ES modules (``import ... from "./protocol.js"``, ``import("./x.js")``) to
    the hashed names (Django's ``support_js_module_import_aggregation``, Django 4.2+).

    Why: the chat page loads ``static/chat/main.js``, which imports its sibling modules
    and the vendored libraries by relative URL. Unrewritten, those URLs name the unhashed
    copies, which whitenoise serves with a 60 s max-age: after a deploy a new main.js
    could meet an old protocol.js from a cache (one missing export and no module of the
    page runs), and every module would be revalidated, one import level after the other,
    once a minute. Rewritten, the whole module graph is one version and cached for good.

    Django finds imports with regular expressions, comments included: a module must not
    spell an ``import("...")`` of itself, even in a comment (collectstatic then fails with
    "Max post-process passes exceeded").
    """

    support_js_module_import_aggregation = True
