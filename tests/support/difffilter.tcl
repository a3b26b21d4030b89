# difffilter.tcl -- the pytclmilter half of tests/test_differential_libmilter.py: the filter of
# tests/support/difffilter.c written as a TclMilter script.
#
#   pytclmilter run difffilter.tcl --connection SPEC -- INSTRUCTIONS LOG ?EVENT ...?
#
# Every callback but the EVENTs named writes one line to LOG, the same line difffilter.c writes
# (its header says what the lines and the INSTRUCTIONS are), and answers as INSTRUCTIONS say.
package require TclMilter 1.0

lassign $argv instructions logfile
set unregistered [lrange $argv 2 end]
set log [open $logfile a]
fconfigure $log -buffering line -translation lf -encoding iso8859-1
# The macros every line shows when they have a value (difffilter.c, MACROS).
set macros {j {{daemon_name}} i {{i}} {{mail_addr}} {{rcpt_addr}} {{tls_version}} {{auth_type}} {{auth_authen}}
    {{auth_author}} {{auth_ssf}}}

# A byte outside 0x21-0x7e, and the backslash, as \xHH: a character the MTA sent as a byte that
# is not UTF-8 (U+DC80 + byte) as that byte, any other as the bytes of its UTF-8 form.
proc esc {s} {
    if {[regexp {^[!-\[\]-~]*$} $s]} {
        return $s
    }
    set out ""
    foreach c [split $s ""] {
        scan $c %c n
        if {$n >= 0x21 && $n <= 0x7e && $n != 0x5c} {
            append out $c
        } elseif {$n >= 0xdc80 && $n <= 0xdcff} {
            append out [format {\x%02x} [expr {$n - 0xdc00}]]
        } elseif {$n < 0x80} {
            append out [format {\x%02x} $n]
        } else {
            binary scan [encoding convertto utf-8 $c] cu* bytes
            foreach b $bytes {
                append out [format {\x%02x} $b]
            }
        }
    }
    return $out
}

proc L {ctx name args} {
    set line $name
    foreach a $args {
        append line " " [esc $a]
    }
    set sep " |"
    foreach m $::macros {
        set v [$ctx getsymval $m]
        if {$v ne ""} {
            append line $sep " " $m = [esc $v]
            set sep ""
        }
    }
    puts $::log $line
}

proc answer {ctx name} {
    set n [incr ::calls($name)]
    if {[info exists ::instr($name#$n)]} {
        set spec $::instr($name#$n)
    } elseif {[info exists ::instr($name)]} {
        set spec $::instr($name)
    } else {
        return SMFIS_CONTINUE
    }
    regexp {^(\S+)(?: (\S+))?(?: (\S+))?(?: (.*))?$} $spec -> status rcode xcode message
    if {$message ne ""} {
        $ctx setreply $rcode $xcode $message
    } elseif {$xcode ne ""} {
        $ctx setreply $rcode $xcode
    } elseif {$rcode ne ""} {
        $ctx setreply $rcode
    }
    return SMFIS_[string toupper $status]
}

proc action {ctx what} {
    switch -- $what {
        addheader { $ctx addheader X-Diff "added value" }
        insheader { $ctx insheader X-Diff-Ins 1 inserted }
        chgheader { $ctx chgheader Subject 2 changed }
        delheader { $ctx chgheader X-Old 1 {} }
        addrcpt { $ctx addrcpt <added@example.net> }
        addrcpt_par { $ctx addrcpt <added2@example.net> NOTIFY=NEVER }
        delrcpt { $ctx delrcpt <b@example.com> }
        chgfrom { $ctx chgfrom <new@example.net> }
        chgfrom_par { $ctx chgfrom <new@example.net> RET=HDRS }
        replacebody { $ctx replacebody "new body\r\n" }
        quarantine { $ctx quarantine "held for review" }
        progress { $ctx progress }
    }
}

proc cb_negotiate {ctx version actions protocol} {
    array unset ::instr
    array unset ::calls
    set f [open $::instructions]
    foreach line [split [read $f] \n] {
        if {[regexp {^(\S+) (.*)$} $line -> key value]} {
            set ::instr($key) $value
        }
    }
    close $f
    # difffilter.c shows the offer without its no-reply bits (libmilter adds them all)
    L $ctx negotiate [format 0x%x $actions] [format 0x%x [expr {$protocol & ~0xff080}]]
    return [answer $ctx negotiate]
}

proc cb_connect {ctx host addr} {
    array set a $addr
    L $ctx connect $host $a(family) $a(address) $a(port)
    return [answer $ctx connect]
}

# The other callbacks, registered as {cb EVENT}: log the arguments, answer as instructed
# (abort and close: the answer is ignored).
proc cb {event ctx args} {
    L $ctx $event {*}$args
    return [answer $ctx $event]
}

# envfrom and envrcpt, registered as {cb_words EVENT}: the address and its ESMTP arguments.
proc cb_words {event ctx words} {
    return [cb $event $ctx {*}$words]
}

proc cb_eom {ctx} {
    L $ctx eom
    if {[info exists ::instr(actions)]} {
        foreach what [split $::instr(actions) " "] {
            catch {action $ctx $what}  ;# (difffilter.c ignores what smfi_* return: an action not granted)
        }
    }
    return [answer $ctx eom]
}

foreach event {negotiate connect helo envfrom envrcpt data unknown header eoh body eom abort close} {
    if {$event ni $unregistered} {
        switch -- $event {
            negotiate - connect - eom { milter register $event cb_$event }
            envfrom - envrcpt { milter register $event [list cb_words $event] }
            default { milter register $event [list cb $event] }
        }
    }
}
milter main
