"""Check every markdown link [text](target) in README.md and docs/*.md: file targets exist, #anchors match a heading."""

import pathlib
import re
import sys

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
files = [root / "README.md"] + sorted((root / "docs").glob("*.md"))
LINK = re.compile(r'!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+"[^"]*")?\)')


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


bad = n = 0
for f in files:
    for m in LINK.finditer(strip_code(f.read_text(encoding="utf-8"))):
        t = m.group(1)
        if re.match(r"^(https?|mailto):", t):
            continue
        n += 1
        path, _, frag = t.partition("#")
        target = (f.parent / path).resolve() if path else f
        rel = f.relative_to(root)
        if not target.exists():
            print(f"{rel}: {t}: missing file")
            bad += 1
            continue
        if frag and target.suffix == ".md" and frag not in anchors(target):
            print(f"{rel}: {t}: no heading #{frag} in {target.relative_to(root)}")
            bad += 1
# repository paths named in code spans (`kalm/mining/mine.py`, `config/kalm_full.yaml`): they must exist too
PATHREF = re.compile(r"`((?:kalm|scripts|config|workflow|tests|profiles|\.ci)/[\w./-]*\w)(?::\w+)?[`\s:]")
m_paths = 0
for f in files:
    for m in PATHREF.finditer(f.read_text(encoding="utf-8")):
        ref = m.group(1)
        if any(ch in ref for ch in "*{<"):
            continue
        m_paths += 1
        if not (root / ref).exists():
            print(f"{f.relative_to(root)}: `{ref}`: no such path in the repository")
            bad += 1
# dotted names in code spans (`kalm.mining.mine.PoolShards`): the module exists and defines the name
DOTTED = re.compile(r"`(kalm(?:\.\w+)+)(?:\(|`)")
m_names = 0
for f in files:
    for m in DOTTED.finditer(f.read_text(encoding="utf-8")):
        parts, i = m.group(1).split("."), 1
        while i < len(parts) and (
            (root / "/".join(parts[: i + 1])).is_dir() or (root / ("/".join(parts[: i + 1]) + ".py")).exists()
        ):
            i += 1
        mod = root / ("/".join(parts[:i]) + ".py")
        if mod.is_dir() or not mod.exists():
            mod = root / "/".join(parts[:i]) / "__init__.py"
        m_names += 1
        attr = parts[i] if i < len(parts) else None
        src = mod.read_text(encoding="utf-8") if mod.exists() else None
        if src is None or (
            attr
            and not re.search(
                rf"^\s*(?:def|class)\s+{attr}\b|^{attr}\s*[:=]|\b{attr}\b.*import|import.*\b{attr}\b", src, re.M
            )
        ):
            print(f"{f.relative_to(root)}: `{m.group(1)}`: not found")
            bad += 1
print(f"{len(files)} files, {n} local links, {m_paths} path names and {m_names} dotted names checked, {bad} broken")
sys.exit(1 if bad else 0)
