#!/usr/local/bin/tclsh
#
# A simple email address-based blacklist milter
#

package require Tcl 8.4
package require TclMilter 1.0

# Configuration

set blacklist {
    friend@public.com
    spammer@spamdomain.com
}

milter configure -name Blacklist
milter configure -connection {unix:/var/run/blmilter.sock}

# Check to see if an address is on the blacklist

proc is_blacklisted { address } {
    set address [string trim $address <>]

    if {[lsearch -exact $::blacklist $address] != -1} {
        return 1
    }

    return 0
}

# Callbacks

proc bl_header { context name data } {
    if {($name == "From") && [is_blacklisted $data]} {
        return SMFIS_REJECT
    }

    return SMFIS_CONTINUE
}

proc bl_envfrom { context addressList } {
    foreach address $addressList {
        if {[is_blacklisted $address]} {
            return SMFIS_REJECT
        }
    }

    return SMFIS_CONTINUE
}

# Register the callbacks and start up the filter

milter register header bl_header
milter register envfrom bl_envfrom
milter main
file delete /var/run/blmilter.sock
