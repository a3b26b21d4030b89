#!/usr/local/bin/tclsh
#
# greylist.tcl -- greylisting with its state in a store every worker and host sees
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
# A triplet not seen for $max_age seconds is forgotten. Addresses in
# $whitelist (client IPs, or glob patterns of them) are never greylisted.
#
# The triplets live in a store, kept by the Python command "greydb" of
# greylist_store.py (next to this script), so that a retry gets the same answer
# whichever --workers process or host it reaches:
#   sqlite:PATH     a file on this host, shared by any number of workers (default)
#   redis://HOST:PORT/DB   a Redis server shared by several hosts
#   unix:///run/redis/redis-server.sock?db=0   a Redis server on this host, by its socket
# A store that cannot be reached answers as -unavailable says: tempfail (the
# client retries later) or accept (mail flows ungreylisted meanwhile); the
# outage is logged once when it starts and once when the store is back.
# Every $interval seconds a Tcl "after" timer -- Tcl's event loop runs while
# "milter main" serves -- has the store forget the triplets not seen for
# $max_age seconds (Redis forgets them by itself).
#
# Options (after the script name; with pytclmilter put them after --), each
# with an environment variable as fallback, handy in a systemd unit:
#   -store SPEC         GREYLIST_STORE        (default sqlite:/var/lib/greylist/greylist.sqlite)
#   -delay SECONDS      GREYLIST_DELAY        (default 300)
#   -maxage SECONDS     GREYLIST_MAXAGE       (default 3024000, 35 days)
#   -unavailable WHAT   GREYLIST_UNAVAILABLE  (tempfail or accept; default tempfail)
#   -retry SECONDS      GREYLIST_RETRY        (try an unreachable store again after; default 5)
#   -interval SECONDS   GREYLIST_INTERVAL     (default 60)
#
# Run it (the store opens at the first message, after --user dropped root's
# privileges: its directory must belong to that user):
#   pytclmilter check greylist.tcl --python greylist_store.py
#   pytclmilter try greylist.tcl message.eml --python greylist_store.py -- -store sqlite:$HOME/grey.sqlite
#   pytclmilter run greylist.tcl --python greylist_store.py --user greylist --workers 4 \
#       -- -store sqlite:/var/lib/greylist/greylist.sqlite -delay 600
# and in Postfix's main.cf (greylist only mail from the Internet, port 25):
#   smtpd_milters = unix:/var/run/greylist.sock
# The state file of the greylist before its store is imported once with the
# python3 pytclmilter is installed in (the one next to the pytclmilter program):
#   /opt/pytclmilter/bin/python3 greylist_store.py import /var/lib/greylist/greylist.db \
#       sqlite:/var/lib/greylist/greylist.sqlite
#

package require Tcl 8.4
package require TclMilter 1.0

if {[info commands greydb] eq ""} {
    error "greylist.tcl keeps its triplets with greylist_store.py: run it with --python greylist_store.py"
}

# Configuration

set settings {
    -store       store       GREYLIST_STORE       sqlite:/var/lib/greylist/greylist.sqlite
    -delay       delay       GREYLIST_DELAY       300
    -maxage      max_age     GREYLIST_MAXAGE      3024000
    -unavailable unavailable GREYLIST_UNAVAILABLE tempfail
    -retry       retry       GREYLIST_RETRY       5
    -interval    interval    GREYLIST_INTERVAL    60
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
        error "unknown option \"$option\": must be -store, -delay, -maxage, -unavailable, -retry or -interval"
    }
    set [lindex $settings [expr {$i + 1}]] $value
}
if {![string is integer -strict $interval] || $interval < 1} {
    error "interval must be a number of seconds, not \"$interval\""
}
# (greydb checks the rest, and says which option is wrong)
greydb configure -store $store -delay $delay -maxage $max_age -unavailable $unavailable -retry $retry

milter configure -name Greylist
milter configure -connection {unix:/var/run/greylist.sock}

# Every $interval seconds: forget old triplets

proc housekeeping { } {
    greydb expire
    after [expr {$::interval * 1000}] housekeeping
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
    set ip [$context getpriv client]
    if {[whitelisted $ip]} {
        return SMFIS_CONTINUE
    }
    set rcpt [string tolower [string trim [lindex $rcptList 0] <>]]
    set answer [greydb check $ip [$context getpriv sender] $rcpt]
    switch -- [lindex $answer 0] {
        pass {
            return SMFIS_CONTINUE
        }
        wait {
            set wait [lindex $answer 1]
            set unit [expr {$wait == 1 ? "second" : "seconds"}]
            $context setreply 451 4.7.1 "Greylisted, please try again in $wait $unit"
            return SMFIS_TEMPFAIL
        }
        default {
            # the store cannot be reached (and -unavailable is tempfail)
            $context setreply 451 4.3.0 "Greylisting temporarily unavailable, please try again later"
            return SMFIS_TEMPFAIL
        }
    }
}

# Start the timer, register the callbacks and start up the filter

after [expr {$interval * 1000}] housekeeping

milter register connect gl_connect
milter register envfrom gl_envfrom
milter register envrcpt gl_envrcpt
milter main

# pytclmilter has removed its socket file by now (TclMilter 1.0 left it when run as root);
# where this user may not (--user, a directory of root's) pytclmilter has said so in the log,
# which is no reason for the stop to fail: hence the catch
if {[regexp {^(unix|local):(.+)$} [milter configure -connection] -> proto path]} {
    catch {file delete $path}
}
