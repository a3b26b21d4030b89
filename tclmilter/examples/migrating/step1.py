"""legacy.tcl, step 1 (docs/migrating.md): is_blacklisted in Python, as a Tcl command.

The script calls ``is_blacklisted`` as before; only the proc (and the loading of the list) left
step1.tcl. ``pytclmilter run step1.tcl --python step1.py``
"""

from pathlib import Path

BLACKLIST = Path(__file__).with_name("blacklist.txt")


def read_blacklist() -> set[str]:
    # as legacy.tcl reads it, [split [string trim [read $f]] "\n"]: each line as written, a blank
    # one as "" (which the null sender <> matches), none from an empty file
    text = BLACKLIST.read_text().strip()
    return set(text.split("\n")) if text else set()


def setup(milter):
    blacklist = read_blacklist()

    @milter.tcl_command("is_blacklisted")
    def is_blacklisted(address):
        # Tcl's `string trim $address <>`; True/False reach Tcl as 1/0
        return address.strip("<>").lower() in blacklist
