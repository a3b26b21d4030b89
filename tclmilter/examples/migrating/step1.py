"""legacy.tcl, step 1 (docs/migrating.md): is_blacklisted in Python, as a Tcl command.

The script calls ``is_blacklisted`` as before; only the proc (and the loading of the list) left
step1.tcl. ``pytclmilter run step1.tcl --python step1.py``
"""

from pathlib import Path

BLACKLIST = Path(__file__).with_name("blacklist.txt")


def read_blacklist() -> set[str]:
    return {line.strip().lower() for line in BLACKLIST.read_text().splitlines() if line.strip()}


def setup(milter):
    blacklist = read_blacklist()

    @milter.tcl_command("is_blacklisted")
    def is_blacklisted(address):
        # Tcl's `string trim $address <>`; True/False reach Tcl as 1/0
        return address.strip("<>").lower() in blacklist
