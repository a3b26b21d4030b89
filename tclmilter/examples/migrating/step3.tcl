#!/usr/local/bin/tclsh
#
# legacy.tcl, step 3 (docs/migrating.md): every proc and callback is in step3.py; the script
# keeps the configuration and the command line it always had. Run with: --python step3.py
#

package require Tcl 8.4
package require TclMilter 1.0

milter configure -name Legacy
milter configure -connection {unix:/var/run/legacy.sock}

milter main
