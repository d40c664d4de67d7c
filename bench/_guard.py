"""Every bench ends with one JSON object on stdout, also when it fails.

``guarded(main)`` runs a bench's ``main``; if it raises (or exits with a message),
the traceback goes to stderr as usual and the last stdout line is
``{"error": "..."}``, so whatever reads the result finds a verdict rather than a
half-printed log, and the exit status is not 0.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable


def guarded(main: Callable[[], int | None]) -> int:
    try:
        code = main()
    except KeyboardInterrupt:
        print(json.dumps({"error": "interrupted"}), flush=True)
        return 130
    except SystemExit as e:
        if e.code in (0, None):
            return 0
        if isinstance(e.code, int):  # argparse's usage error and the like: already said
            print(json.dumps({"error": f"exited with status {e.code}"}), flush=True)
            return e.code
        print(e.code, file=sys.stderr)
        print(json.dumps({"error": str(e.code)}), flush=True)
        return 1
    except Exception as e:  # noqa: BLE001 - turned into the verdict line
        traceback.print_exc()
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        return 1
    return int(code or 0)
