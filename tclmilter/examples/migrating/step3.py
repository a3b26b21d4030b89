"""legacy.tcl, step 3 (docs/migrating.md): every proc and callback in Python.

step3.tcl keeps the configuration, so the filter runs as it always did; the script has no proc
left, and the next step can be a Python program of its own (``Milter(...).run()``).
``pytclmilter run step3.tcl --python step3.py``
"""

from pathlib import Path

from pytclmilter import CONTINUE, REJECT

BLACKLIST = Path(__file__).with_name("blacklist.txt")
#: Points a subject scores for each word it contains.
SPAM_WORDS = {"free": 2, "money": 2, "win": 2, "won": 2, "prize": 2, "!!!": 2}


def read_blacklist() -> set[str]:
    # as legacy.tcl reads it, [split [string trim [read $f]] "\n"]: each line as written, a blank
    # one as "" (which the null sender <> matches), none from an empty file
    text = BLACKLIST.read_text().strip()
    return set(text.split("\n")) if text else set()


def subject_score(subject: str) -> int:
    subject = subject.lower()
    return sum(points for word, points in SPAM_WORDS.items() if word in subject)


def setup(milter):
    blacklist = read_blacklist()

    @milter.register("envfrom")
    def lg_envfrom(ctx, args):
        if args[0].strip("<>").lower() in blacklist:
            ctx.setreply("550", "5.7.1", "sender blacklisted")
            return REJECT
        ctx.setpriv("score", 0)
        return CONTINUE

    @milter.register("header")
    def lg_header(ctx, name, value):
        if name.lower() == "subject":
            ctx.setpriv("score", subject_score(value))
            ctx.setpriv("subject", value)

    @milter.register("eom")
    def lg_eom(ctx):
        score = ctx.getpriv("score")
        if score >= 6:
            ctx.setreply("550", "5.7.1", f"spam score {score}")
            return REJECT
        if score > 0:
            ctx.addheader("X-Spam-Score", f"{score} ({ctx.getpriv('subject')})")
        return CONTINUE
