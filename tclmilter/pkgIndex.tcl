# TclMilter 1.0 as provided by pytclmilter. The package works in the interpreter
# that `pytclmilter run` creates; loaded anywhere else (a secondary thread, say)
# it offers only `milter stop`, exactly as TclMilter 1.0 did.
package ifneeded TclMilter 1.0 [list source [file join $dir tclmilter.tcl]]
