#!/usr/local/bin/tclsh
#
# A legacy filter, as it ran under TclMilter 1.0: blacklisted senders are rejected, and a
# subject that scores as spam is rejected or marked. docs/migrating.md moves it to Python one
# proc at a time: step1.tcl + step1.py, step2.tcl + step2.py, step3.tcl + step3.py.
#

package require Tcl 8.4
package require TclMilter 1.0

milter configure -name Legacy
milter configure -connection {unix:/var/run/legacy.sock}

# The blacklist: one address per line, in blacklist.txt next to this script

set f [open [file join [file dirname [info script]] blacklist.txt]]
set blacklist [split [string trim [read $f]] "\n"]
close $f

# Points a subject scores for each word it contains

set spamwords {free 2 money 2 win 2 won 2 prize 2 !!! 2}

proc is_blacklisted { address } {
    expr {[lsearch -exact $::blacklist [string tolower [string trim $address <>]]] >= 0}
}

proc subject_score { subject } {
    set score 0
    set subject [string tolower $subject]
    foreach {word points} $::spamwords {
        if {[string first $word $subject] >= 0} {
            incr score $points
        }
    }
    return $score
}

# Callbacks

proc lg_envfrom { context addressList } {
    if {[is_blacklisted [lindex $addressList 0]]} {
        $context setreply 550 5.7.1 "sender blacklisted"
        return SMFIS_REJECT
    }
    $context setpriv score 0
    return SMFIS_CONTINUE
}

proc lg_header { context name value } {
    if {[string equal -nocase $name Subject]} {
        $context setpriv score [subject_score $value]
        $context setpriv subject $value
    }
    return SMFIS_CONTINUE
}

proc lg_eom { context } {
    set score [$context getpriv score]
    if {$score >= 6} {
        $context setreply 550 5.7.1 "spam score $score"
        return SMFIS_REJECT
    }
    if {$score > 0} {
        $context addheader X-Spam-Score "$score ([$context getpriv subject])"
    }
    return SMFIS_CONTINUE
}

milter register envfrom lg_envfrom
milter register header lg_header
milter register eom lg_eom
milter main
