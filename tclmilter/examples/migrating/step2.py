"""legacy.tcl, step 2 (docs/migrating.md): the header callback in Python as well.

It still scores with the script's ``subject_score`` proc, through ``ctx.tcl``; private data is
shared, so the script's eom callback reads the score and the subject this callback sets.
``pytclmilter run step2.tcl --python step2.py``
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
        return address.strip("<>").lower() in blacklist

    @milter.register("header")
    def lg_header(ctx, name, value):
        if name.lower() == "subject":
            ctx.setpriv("score", int(ctx.tcl("subject_score", value)))
            ctx.setpriv("subject", value)
