#!/usr/local/bin/tclsh
#
# greylist.tcl -- greylisting with its state in a file
#
# The first time a triplet (client IP address, envelope sender, recipient) is
# seen, that recipient is refused with a temporary error:
#
#   451 4.7.1 Greylisted, please try again in 300 seconds
#
# A real mail server queues the message and tries again later; once $delay
# seconds have passed since the triplet was first seen, it is accepted (and
# every later message with the same triplet too). Spam software that never
# retries never gets through. A retry that comes too early is refused again.
# Addresses in $whitelist (client IPs, or glob patterns of them) are never
# greylisted.
#
# The state lives in memory and in $state_file, one Tcl list per line:
#
#   client-ip sender recipient first-seen last-seen
#
# (times in seconds since 1970, from "clock seconds"). The file is read at
# start. Every $interval seconds a Tcl "after" timer -- Tcl's event loop runs
# while "milter main" serves -- forgets triplets not seen for $max_age
# seconds, reads the file again if someone else changed it (merging what it
# holds) and writes it if anything changed (to a temporary file, then
# renamed over the old one). It is written once more when the filter stops.
# An administrator may edit the file while the filter runs, e.g. to let a
# triplet through at once by lowering its first-seen time.
#
# Options (after the script name; with pytclmilter put them after --), each
# with an environment variable as fallback, handy in a systemd unit:
#   -state FILE        GREYLIST_STATE     (default /var/lib/greylist/greylist.db)
#   -delay SECONDS     GREYLIST_DELAY     (default 300)
#   -interval SECONDS  GREYLIST_INTERVAL  (default 60)
#   -maxage SECONDS    GREYLIST_MAXAGE    (default 3024000, 35 days)
#
# Run it:
#   pytclmilter check greylist.tcl
#   GREYLIST_STATE=/tmp/grey.db pytclmilter try greylist.tcl message.eml
#   pytclmilter run greylist.tcl -- -state /var/lib/greylist/greylist.db -delay 600
# and in Postfix's main.cf (greylist only mail from the Internet, port 25):
#   smtpd_milters = unix:/var/run/greylist.sock
#

package require Tcl 8.4
package require TclMilter 1.0

# Configuration

set settings {
    -state    state_file GREYLIST_STATE    /var/lib/greylist/greylist.db
    -delay    delay      GREYLIST_DELAY    300
    -interval interval   GREYLIST_INTERVAL 60
    -maxage   max_age    GREYLIST_MAXAGE   3024000
}
set whitelist {}

foreach {option var envvar default} $settings {
    if {[info exists env($envvar)]} {
        set $var $env($envvar)
    } else {
        set $var $default
    }
}
foreach {option value} $argv {
    set i [lsearch -exact $settings $option]
    if {$i < 0 || $i % 4 != 0} {
        error "unknown option \"$option\": must be -state, -delay, -interval or -maxage"
    }
    set [lindex $settings [expr {$i + 1}]] $value
}
foreach var {delay interval max_age} {
    if {![string is integer -strict [set $var]] || [set $var] < 0} {
        error "$var must be a number of seconds, not \"[set $var]\""
    }
}
if {$interval < 1} {
    set interval 1
}

milter configure -name Greylist
milter configure -connection {unix:/var/run/greylist.sock}

# The state: seen([list ip sender rcpt]) = [list first-seen last-seen]

array set seen {}
set dirty 0
set file_mtime 0

proc load_state { } {
    global seen state_file file_mtime
    if {![file exists $state_file]} {
        return
    }
    set f [open $state_file r]
    while {[gets $f line] >= 0} {
        if {[catch {llength $line} n] || $n != 5} {
            continue
        }
        foreach {ip sender rcpt first last} $line break
        set key [list $ip $sender $rcpt]
        if {[info exists seen($key)]} {
            # merge: the earlier first sight and the later last sight win
            foreach {f0 l0} $seen($key) break
            if {$f0 < $first} { set first $f0 }
            if {$l0 > $last} { set last $l0 }
        }
        set seen($key) [list $first $last]
    }
    close $f
    set file_mtime [file mtime $state_file]
}

proc save_state { } {
    global seen state_file file_mtime dirty
    set tmp $state_file.tmp
    if {[catch {
        set f [open $tmp w]
        foreach key [lsort [array names seen]] {
            puts $f [concat $key $seen($key)]
        }
        close $f
        file rename -force $tmp $state_file
        set file_mtime [file mtime $state_file]
        set dirty 0
    } err]} {
        puts stderr "greylist: cannot write $state_file: $err"
    }
}

# Every $interval seconds: expire, merge outside changes, save

proc housekeeping { } {
    global seen max_age state_file file_mtime dirty interval
    set now [clock seconds]
    foreach key [array names seen] {
        if {$now - [lindex $seen($key) 1] > $max_age} {
            unset seen($key)
            set dirty 1
        }
    }
    if {[file exists $state_file] && [file mtime $state_file] != $file_mtime} {
        load_state
        set dirty 1
    }
    if {$dirty} {
        save_state
    }
    after [expr {$interval * 1000}] housekeeping
}

proc whitelisted { ip } {
    foreach pattern $::whitelist {
        if {[string match $pattern $ip]} {
            return 1
        }
    }
    return 0
}

# Callbacks

proc gl_connect { context hostname addrInfo } {
    array set info {address {}}
    array set info $addrInfo
    set ip $info(address)
    if {$ip == ""} {
        set ip $hostname
    }
    $context setpriv client $ip
    return SMFIS_CONTINUE
}

proc gl_envfrom { context fromList } {
    $context setpriv sender [string tolower [string trim [lindex $fromList 0] <>]]
    return SMFIS_CONTINUE
}

proc gl_envrcpt { context rcptList } {
    global seen delay dirty
    set ip [$context getpriv client]
    if {[whitelisted $ip]} {
        return SMFIS_CONTINUE
    }
    set rcpt [string tolower [string trim [lindex $rcptList 0] <>]]
    set key [list $ip [$context getpriv sender] $rcpt]
    set now [clock seconds]

    if {![info exists seen($key)]} {
        set seen($key) [list $now $now]
        set dirty 1
        $context setreply 451 4.7.1 "Greylisted, please try again in $delay seconds"
        return SMFIS_TEMPFAIL
    }

    set first [lindex $seen($key) 0]
    set seen($key) [list $first $now]
    set dirty 1
    set wait [expr {$first + $delay - $now}]
    if {$wait > 0} {
        $context setreply 451 4.7.1 "Greylisted, please try again in $wait seconds"
        return SMFIS_TEMPFAIL
    }
    return SMFIS_CONTINUE
}

# Load the state, start the timer, register the callbacks and start up the filter

load_state
after [expr {$interval * 1000}] housekeeping

milter register connect gl_connect
milter register envfrom gl_envfrom
milter register envrcpt gl_envrcpt
milter main

# Stopped: keep what was learnt
if {$dirty} {
    save_state
}
if {[regexp {^(unix|local):(.+)$} [milter configure -connection] -> proto path]} {
    file delete $path
}
