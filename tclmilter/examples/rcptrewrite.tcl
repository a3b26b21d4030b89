#!/usr/local/bin/tclsh
#
# rcptrewrite.tcl -- rewrite envelope recipients (and senders) from a map
#
# Mail for an old address is delivered to its new address(es) instead: at end
# of message the filter removes the old recipient with "delrcpt" (in the very
# form the MTA gave it to envrcpt, angle brackets included) and adds each new
# one with "addrcpt". One old address may map to several new ones. A header
# records what was done:
#
#   X-Rcpt-Rewritten: <sales@example.com> -> <team-sales@example.com>
#
# Only the envelope changes; the To: and Cc: headers stay as the sender wrote
# them. Addresses are compared without case and angle brackets, and a quoted
# local part as the same one unquoted ("sales"@example.com is sales@example.com).
#
# The same is done for envelope senders listed in sender_map, with "chgfrom".
# chgfrom is new in pytclmilter (TclMilter 1.0 had no smfi_chgfrom): under
# TclMilter 1.0 the call fails, the error is caught and the sender is kept.
#
# Options (after the script name; with pytclmilter put them after --):
#   -map FILE    read more recipient mappings from FILE: one per line,
#                "old new ?new ...?", # starts a comment
#
# Run it:
#   pytclmilter check rcptrewrite.tcl
#   pytclmilter try rcptrewrite.tcl message.eml --rcpt sales@example.com
#   pytclmilter run rcptrewrite.tcl -- -map /etc/mail/rcptrewrite.map
# and in Postfix's main.cf:  smtpd_milters = unix:/var/run/rcptrewrite.sock
#

package require Tcl 8.4
package require TclMilter 1.0

# Configuration: old address -> list of new addresses

array set rcpt_map {
    sales@example.com       {team-sales@example.com}
    info@example.com        {alice@example.com bob@example.com}
    j.smith@example.com     {john.smith@example.com}
}

array set sender_map {
    noreply@legacy.example.com   noreply@example.com
}

foreach {option value} $argv {
    switch -- $option {
        -map {
            set f [open $value r]
            set number 0
            while {[gets $f line] >= 0} {
                incr number
                set line [string trim [regsub {#.*} $line ""]]
                # each line is read as a Tcl list: say which one is none
                if {[catch {llength $line} words]} {
                    close $f
                    error "-map $value line $number: $words: $line"
                }
                if {$words >= 2} {
                    set rcpt_map([string tolower [lindex $line 0]]) [lrange $line 1 end]
                }
            }
            close $f
        }
        default {
            error "unknown option \"$option\": must be -map"
        }
    }
}

milter configure -name RcptRewrite
milter configure -connection {unix:/var/run/rcptrewrite.sock}

proc bare { address } {
    set address [string trim $address "<> \t"]
    # a quoted local part ("sales"@example.com) is the same mailbox as the unquoted one
    if {[regexp {^"((?:[^"\\]|\\.)*)"(@.*)$} $address -> local domain]} {
        regsub -all {\\(.)} $local {\1} local
        set address $local$domain
    }
    return [string tolower $address]
}

# Callbacks

proc rw_envfrom { context fromList } {
    $context unsetpriv msg_*
    $context setpriv msg_rewrites {}
    $context setpriv msg_sender [lindex $fromList 0]
    return SMFIS_CONTINUE
}

proc rw_envrcpt { context rcptList } {
    set rcpt [lindex $rcptList 0]
    set key [bare $rcpt]
    if {[info exists ::rcpt_map($key)]} {
        # remember the address exactly as the MTA knows it, for delrcpt
        set rewrites [$context getpriv msg_rewrites]
        lappend rewrites $rcpt $::rcpt_map($key)
        $context setpriv msg_rewrites $rewrites
    }
    return SMFIS_CONTINUE
}

proc rw_eom { context } {
    foreach {old news} [$context getpriv msg_rewrites] {
        $context delrcpt $old
        set added {}
        foreach new $news {
            $context addrcpt "<$new>"
            lappend added "<$new>"
        }
        $context addheader X-Rcpt-Rewritten "$old -> [join $added {, }]"
    }

    set sender [bare [$context getpriv msg_sender]]
    if {[info exists ::sender_map($sender)]} {
        set new $::sender_map($sender)
        if {[catch {$context chgfrom "<$new>"} err]} {
            puts stderr "rcptrewrite: sender $sender kept: $err"
        } else {
            $context addheader X-Sender-Rewritten "<$sender> -> <$new>"
        }
    }

    $context unsetpriv msg_*
    return SMFIS_CONTINUE
}

proc rw_abort { context } {
    $context unsetpriv msg_*
    return SMFIS_CONTINUE
}

# Register the callbacks and start up the filter

milter register envfrom rw_envfrom
milter register envrcpt rw_envrcpt
milter register eom rw_eom
milter register abort rw_abort
milter main

# pytclmilter has removed its socket file by now (TclMilter 1.0 left it when run as root);
# where this user may not (--user, a directory of root's) pytclmilter has said so in the log,
# which is no reason for the stop to fail: hence the catch
if {[regexp {^(unix|local):(.+)$} [milter configure -connection] -> proto path]} {
    catch {file delete $path}
}
