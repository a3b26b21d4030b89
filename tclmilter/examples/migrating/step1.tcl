#!/usr/local/bin/tclsh
#
# legacy.tcl, step 1 (docs/migrating.md): is_blacklisted is now a command written in Python
# (step1.py), which reads blacklist.txt itself. Run with: --python step1.py
#

package require Tcl 8.4
package require TclMilter 1.0

milter configure -name Legacy
milter configure -connection {unix:/var/run/legacy.sock}

# Points a subject scores for each word it contains

set spamwords {free 2 money 2 win 2 won 2 prize 2 !!! 2}

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
