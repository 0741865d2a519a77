"""What collectstatic gives a deployment: the chat page's ES modules name each other by
hashed names, so a browser never runs modules of two versions together after a deploy
(chatproject/storage.py)."""

import json
import posixpath
import re

from django.core.management import call_command

# `from "./x.js"`, `import "./x.js"`, `import("./x.js")`: relative specifiers only.
RELATIVE_IMPORT = re.compile(r"""(?:\bfrom|\bimport)\s*\(?\s*["'](\.{1,2}/[^"']+)["']""")


def collect_static(settings, root):
    """Run collectstatic into ``root`` with the deployment's storage, on the project's own
    static/ (the apps' admin and API files are not what this is about)."""
    settings.STATIC_ROOT = root
    settings.STATICFILES_FINDERS = ["django.contrib.staticfiles.finders.FileSystemFinder"]
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "chatproject.storage.StaticStorage"},
    }
    call_command("collectstatic", "--noinput", verbosity=0)
    return json.loads((root / "staticfiles.json").read_text())["paths"]


def test_every_chat_module_a_deployed_page_loads_is_reached_by_its_hashed_name(
    settings, tmp_path
):
    manifest = collect_static(settings, tmp_path)
    hashed_names = set(manifest.values())
    reached, todo = set(), [manifest["chat/main.js"]]
    while todo:
        name = todo.pop()
        if name in reached:
            continue
        reached.add(name)
        for spec in RELATIVE_IMPORT.findall((tmp_path / name).read_text()):
            target = posixpath.normpath(posixpath.join(posixpath.dirname(name), spec))
            assert target in hashed_names, f"{name} imports {spec}, not a hashed file"
            todo.append(target)
    modules = {manifest[n] for n in manifest if n.startswith("chat/") and n.endswith(".js")}
    assert modules <= reached, f"never imported from main.js: {sorted(modules - reached)}"
    assert manifest["vendor/marked/marked.esm.js"] in reached
