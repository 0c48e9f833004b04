"""The docs name only what exists (run by `make lint`), in README.md and docs/*.md:

- every markdown link [text](target): its file exists, its #anchor matches a heading (GitHub slugs);
- every repository path in a code span (`kalm/mining/mine.py`, `config/kalm_full.yaml`);
- every dotted name in a code span (`kalm.mining.mine.PoolShards`): its module exists and defines it.
"""

import pathlib
import re
import sys

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
LINK = re.compile(r'!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+"[^"]*")?\)')
PATHREF = re.compile(r"`((?:kalm|scripts|config|workflow|tests|profiles|\.ci)/[\w./-]*\w)(?::\w+)?[`\s:]")
DOTTED = re.compile(r"`(kalm(?:\.\w+)+)(?:\(|`)")


def strip_code(text):
    text = re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.S | re.M)  # fenced blocks
    return re.sub(r"`[^`\n]*`", "", text)  # inline code


def slug(h):
    h = re.sub(r"[*_`]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", h.strip().lower())
    h = re.sub(r"[^\w\- ]", "", h)  # GitHub: drop punctuation except - and space
    return h.replace(" ", "-")


def anchors(path):
    out, seen = set(), {}
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, flags=re.M):
        s = slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def link_problem(page, target):
    path, _, frag = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    if not dest.exists():
        return "missing file"
    if frag and dest.suffix == ".md" and frag not in anchors(dest):
        return f"no heading #{frag} in {dest.relative_to(root)}"
    return None


def path_problem(ref):
    return None if (root / ref).exists() else "no such path in the repository"


def name_problem(dotted):
    """None when the longest module prefix of ``dotted`` exists and defines the next part (if any)."""
    parts, i = dotted.split("."), 1
    while i < len(parts) and any(
        (root / "/".join(parts[: i + 1])).with_suffix(s).exists() or (root / "/".join(parts[: i + 1])).is_dir()
        for s in ("", ".py")
    ):
        i += 1
    base = root / "/".join(parts[:i])
    module = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    if not module.exists():
        return "no such module"
    if i == len(parts):
        return None
    attr = parts[i]
    defined = rf"^\s*(?:def|class)\s+{attr}\b|^{attr}\s*[:=]|\b{attr}\b.*import|import.*\b{attr}\b"
    return None if re.search(defined, module.read_text(encoding="utf-8"), re.M) else "not found"


def problems(page):
    text = page.read_text(encoding="utf-8")
    for m in LINK.finditer(strip_code(text)):
        if not re.match(r"^(https?|mailto):", m.group(1)):
            yield "link", m.group(1), link_problem(page, m.group(1))
    for m in PATHREF.finditer(text):
        if not any(ch in m.group(1) for ch in "*{<"):
            yield "path", f"`{m.group(1)}`", path_problem(m.group(1))
    for m in DOTTED.finditer(text):
        yield "name", f"`{m.group(1)}`", name_problem(m.group(1))


def main():
    pages = [root / "README.md"] + sorted((root / "docs").glob("*.md"))
    counts, bad = {"link": 0, "path": 0, "name": 0}, 0
    for page in pages:
        for kind, what, problem in problems(page):
            counts[kind] += 1
            if problem:
                print(f"{page.relative_to(root)}: {what}: {problem}")
                bad += 1
    print(
        f"{len(pages)} files, {counts['link']} local links, {counts['path']} path names and "
        f"{counts['name']} dotted names checked, {bad} broken"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
