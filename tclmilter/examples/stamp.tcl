#!/usr/local/bin/tclsh
#
# stamp.tcl -- stamp every message with where and by whom it was filtered
#
# At the end of each message this filter adds one header:
#
#   X-Filtered-By: Stamp on mx.example.org (daemon mx.example.org); queue-id 4Xyz1234;
#    client mail.example.net [192.0.2.7] port 40123
#
# The MTA's host name comes from the macro j, the daemon from {daemon_name},
# the queue id from i (both read with "getsymval"); the client's name and
# address are what the connect callback received (hostname and addrInfo) and
# are kept in the context's private data until the connection ends.
# A missing macro is written as "unknown" (getsymval returns "" for it).
# Long macro names keep their braces: in Tcl that is {{daemon_name}} or
# "{daemon_name}" -- a plain {daemon_name} is Tcl quoting and asks for a macro
# called daemon_name, which no MTA sends.
#
# Postfix sends j and {daemon_name} with the connect event and i with every
# event from the first accepted recipient on (milter_connect_macros and
# milter_end_of_data_macros in main.cf); Sendmail's defaults include them too.
# Postfix's {daemon_name} is its host name unless milter_macro_daemon_name says
# otherwise (as above); Sendmail's is the daemon's Name= (MTA, MSA).
#
# Run it:
#   pytclmilter check stamp.tcl                   # what it registers and negotiates
#   pytclmilter try stamp.tcl message.eml         # one message, no MTA needed
#   pytclmilter run stamp.tcl                     # serve on unix:/var/run/stamp.sock
#   pytclmilter run stamp.tcl --connection inet:8891@127.0.0.1
# and in Postfix's main.cf:  smtpd_milters = unix:/var/run/stamp.sock
# (see docs/deployment.md for socket permissions and chroot).
#

package require Tcl 8.4
package require TclMilter 1.0

# Configuration

set header_name X-Filtered-By

milter configure -name Stamp
milter configure -connection {unix:/var/run/stamp.sock}

# A macro's value, or "unknown" when the MTA did not send it

proc macro { context name } {
    set value [$context getsymval $name]
    if {$value == ""} {
        return unknown
    }
    return $value
}

# Callbacks

proc stamp_connect { context hostname addrInfo } {
    # addrInfo is a list of key/value pairs: family, address, port
    array set info {family unknown address {} port 0}
    array set info $addrInfo

    switch -- $info(family) {
        inet -
        inet6 {
            set client "$hostname \[$info(address)\] port $info(port)"
        }
        unix {
            set client "$hostname via unix socket $info(address)"
        }
        default {
            set client "$hostname (address unknown)"
        }
    }

    $context setpriv client $client
    return SMFIS_CONTINUE
}

proc stamp_eom { context } {
    set value "[milter configure -name] on [macro $context j] (daemon [macro $context {{daemon_name}}]);"
    append value " queue-id [macro $context i];"
    # fold the line: a newline followed by white space continues a header
    append value "\n client [$context getpriv client]"

    $context addheader $::header_name $value
    return SMFIS_CONTINUE
}

# Register the callbacks and start up the filter

milter register connect stamp_connect
milter register eom stamp_eom
milter main

# milter main returns when the filter is stopped (SIGTERM, SIGINT, SIGHUP)
# pytclmilter has removed its socket file by now (TclMilter 1.0 left it when run as root);
# where this user may not (--user, a directory of root's) pytclmilter has said so in the log,
# which is no reason for the stop to fail: hence the catch
if {[regexp {^(unix|local):(.+)$} [milter configure -connection] -> proto path]} {
    catch {file delete $path}
}
