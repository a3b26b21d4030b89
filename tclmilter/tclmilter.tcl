# TclMilter 1.0 command set, hosted by pytclmilter.
#
# In the main interpreter the Python host has created ::tclmilter::py::milter,
# ::tclmilter::py::context and ::tclmilter::py::replacebody before this file is
# sourced. They answer a list {code value}; the procs below turn that into a
# normal Tcl result or error, because tkinter drops the message of an error
# raised inside a Python command.

namespace eval ::tclmilter {
    variable version 1.0
}

if {[llength [info commands ::tclmilter::py::milter]]} {
    proc ::milter {args} {
        set r [::tclmilter::py::milter {*}$args]
        return -code [lindex $r 0] [lindex $r 1]
    }

    # Every context command is an alias of this proc with the connection id.
    proc ::tclmilter::context {id args} {
        if {[lindex $args 0] eq "replacebody" && [llength $args] == 2} {
            # Python fetches the bytes Tcl keeps the text in (tcl/strings.py makes wire bytes
            # of them); as an argument they would be converted to text and back.
            variable outgoing [encoding convertto identity [lindex $args 1]]
            set r [::tclmilter::py::replacebody $id]
            unset outgoing
            return -code [lindex $r 0] [lindex $r 1]
        }
        set r [::tclmilter::py::context $id {*}$args]
        return -code [lindex $r 0] [lindex $r 1]
    }

    # Let `milter stop` work from secondary threads (TclMilter 1.0 allowed exactly that).
    if {![catch {package require Thread}]} {
        tsv::set ::tclmilter main [thread::id]
    }
} else {
    # A secondary thread or a foreign interpreter: only `milter stop` works here.
    proc ::milter {args} {
        if {[llength $args] == 0} {
            return -code error "wrong # args: should be \"milter option ?arg ...?\""
        }
        if {[lindex $args 0] ne "stop"} {
            return -code error "milter [lindex $args 0]: only \"milter stop\" works outside the main interpreter"
        }
        if {[llength $args] != 1} {
            return -code error "wrong # args: should be \"milter stop\""
        }
        if {[catch {package require Thread}] || ![tsv::exists ::tclmilter main]} {
            return -code error "milter stop: no running pytclmilter interpreter to stop"
        }
        thread::send -async [tsv::get ::tclmilter main] {::milter stop}
        return
    }
}

package provide TclMilter 1.0
