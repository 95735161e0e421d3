"""Runs ClickHouse statements through chdb (an embedded ClickHouse) for the backend's tests.

Usage: python3 chdb_check.py DIR < statements.json > results.json

DIR holds config.xml (with users.xml and users.d beside it). Input: a JSON list of
{"sql": ..., "mode": "parse" | "exec"}. "parse" runs SELECT formatQuery('<sql>'), which
parses without executing; "exec" runs the statement as the `default` user. Output: a JSON list
of {"code": <ClickHouse error code or null>, "result": <rows as text, or the error's first line>}.
Exit code 3 when chdb cannot be imported, so the caller can skip; 1 instead when CI is set.
"""

import json
import os
import re
import sys

try:
    import chdb
except ImportError as e:
    print(f"chdb is not installed: {e}", file=sys.stderr)
    # Under CI scripts/test.sh installs it: a skip there would hide a missing install step.
    sys.exit(1 if os.environ.get("CI") else 3)


def literal(text):
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def main():
    root = sys.argv[1]
    statements = json.load(sys.stdin)
    conn = chdb.connect(
        f"file:{os.path.join(root, 'db')}?config-file={os.path.join(root, 'config.xml')}"
    )
    results = []
    for item in statements:
        sql = item["sql"]
        if item["mode"] == "parse":
            sql = f"SELECT formatQuery({literal(sql)})"
        try:
            # The statement's own FORMAT clause, if any, wins over this default.
            text = str(conn.query(sql, "TabSeparatedRaw")).rstrip("\n")
            results.append({"code": None, "result": text})
        except Exception as e:  # chdb raises its own error type with ClickHouse's message
            message = str(e)
            code = re.search(r"Code: (\d+)", message)
            results.append(
                {
                    "code": int(code.group(1)) if code else -1,
                    "result": message.splitlines()[0] if message else "",
                }
            )
    conn.close()
    json.dump(results, sys.stdout)


main()
