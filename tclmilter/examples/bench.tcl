#!/usr/local/bin/tclsh
#
# bench.tcl -- the benchmark workload of scripts/bench, as a TclMilter script
#
# Registers connect, envfrom, envrcpt, header and eom; every callback answers
# SMFIS_CONTINUE and the eom callback adds the header "X-Bench: 1". The same
# workload exists as a Python filter (scripts/bench_filter.py), a pymilter
# filter (scripts/bench_pymilter.py) and a C libmilter filter
# (scripts/bench_libmilter.c), so that the four can be measured side by side.
#
# Script arguments (after --): "body" also registers a body callback, so the
# MTA sends the body instead of skipping it (scripts/bench --body-callback).
#
# Run it:
#   pytclmilter run tclmilter/examples/bench.tcl --connection inet:8899@127.0.0.1
#   pytclmilter run tclmilter/examples/bench.tcl --connection inet:8899@127.0.0.1 -- body
#

package require Tcl 8.4
package require TclMilter 1.0

milter configure -name Bench
milter configure -connection {inet:8899@127.0.0.1}

proc bench_connect {context hostname addrInfo} {
    return SMFIS_CONTINUE
}

proc bench_envfrom {context argList} {
    return SMFIS_CONTINUE
}

proc bench_envrcpt {context argList} {
    return SMFIS_CONTINUE
}

proc bench_header {context name value} {
    return SMFIS_CONTINUE
}

proc bench_body {context block} {
    return SMFIS_CONTINUE
}

proc bench_eom {context} {
    $context addheader X-Bench 1
    return SMFIS_CONTINUE
}

milter register connect bench_connect
milter register envfrom bench_envfrom
milter register envrcpt bench_envrcpt
milter register header bench_header
if {[lsearch -exact $argv body] >= 0} {
    milter register body bench_body
}
milter register eom bench_eom
milter main
