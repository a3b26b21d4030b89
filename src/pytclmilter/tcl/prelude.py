"""The Tcl procedures the host's own interpreter defines for itself, evaluated once at its start.

They serve the script's interpreter and every one it creates: Tcl's `exit`, whether any event
can be pending (the event loop's poll), the callbacks' time limit on each interpreter, the
script's own made interpreters' error reports and output, a callback's code other than ok and
error, and the channels flushed as Tcl's exit does.
"""

from __future__ import annotations

from typing import Final

PRELUDE: Final = r"""
proc exit {{returnCode 0}} {
    set r [::tclmilter::py::exit $returnCode]
    return -code [lindex $r 0] [lindex $r 1]
}

# 1 when no Tcl event can be pending: no `after` timer in either interpreter, no channel but the
# standard three and no file event handler on these (`watched`), no second thread (so no
# thread::send). See TclHost.service_events: asked at every tick only while it answers 1
# (TclHost._quiet). (Counting channels was not enough: a daemon's `close stdin` left a script's
# server socket the third channel, and its connections were never accepted.)
# `threads`: 1 once a script's interpreter has run a thread:: command (TclHost.thread_home);
# before, thread::names here would make this interpreter the one Thread sends this thread's
# scripts to.
# A thread's thread::send events stay queued after it ended, so the poll after the last thread is
# gone still happens: `poll` is 1 while threads exist, from the script's thread::create (traced:
# a worker may send and end between two checks), and when service_events left events queued.
namespace eval ::tclmilter::py { variable poll 0; variable std_events 0 }
proc ::tclmilter::py::poll_next {args} { variable poll 1 }
# The script's `fileevent` and `chan event` (traced): a handler on a standard channel is polled for
# from then on (`fileevent stdin readable ...`).
proc ::tclmilter::py::watched {command op} {
    lassign $command - channel - script
    if {$channel in {stdin stdout stderr} && $script ne ""} { variable std_events 1 }
}
proc ::tclmilter::py::quiet {child threads} {
    variable poll
    variable std_events
    if {$std_events} { return 0 }
    # This interpreter's own directly: `interp eval` allows break and continue in the interpreter
    # it evaluates in, and of a pure list Tcl never clears that, so here the next callback's break
    # came back to Python as a normal return (the child lets it through to here: it is this
    # interpreter that makes it Tcl's error). The child's as a pure list, not compiled: a braced
    # literal would be recompiled on every tick.
    if {[llength [after info]] || [llength [interp eval $child [list ::tclmilter::py::after info]]]} { return 0 }
    foreach channel [concat [chan names] [interp eval $child [list ::tcl::chan::names]]] {
        if {$channel ni {stdin stdout stderr}} { return 0 }
    }
    set was $poll
    set poll [expr {$threads && [llength [thread::names]] > 1}]
    expr {!$was && !$poll}
}
# The script's pending `after` events, counted here: the list `after info` makes stays in Tcl
# (tcl/growth.py counts them every few seconds, not on every tick).
proc ::tclmilter::py::after_count {child} { llength [interp eval $child [list ::tclmilter::py::after info]] }

# The callbacks' time limit (tcl/limit.py) on the script's interpreter and on every interpreter the
# script made (`interp create`, also inside those): Tcl checks an interpreter's own limit only,
# so code running in a child would otherwise never be stopped, and a child made in a callback
# keeps the deadline it inherited there, past which it refuses every command for ever.
proc ::tclmilter::py::limit_time {child args} {
    set paths [list $child]
    for {set i 0} {$i < [llength $paths]} {incr i} {
        foreach name [interp slaves [lindex $paths $i]] {
            lappend paths [list {*}[lindex $paths $i] $name]
        }
    }
    foreach path $paths { interp limit $path time {*}$args }
}
# The script's `interp create` (traced): the new interpreter gets the limit in force now, and with
# it the handler that gives a callback with time left its full time (Tcl copies the time alone).
proc ::tclmilter::py::interp_made {command code result op} {
    if {$code == 0 && [string match "cr*" [lindex $command 1]]} { ::tclmilter::py::limit_sync }
}

# An interpreter the script creates (`interp create`, in those too; traced) reports its `after` and
# `fileevent` errors as the script's does (its own ::bgerror first, then the log) where Tcl would
# print them raw on stderr; a safe one's Tcl drops, and still does. Its first thread:: command,
# too, does what the script's does (tclmilter.tcl's threads_used): where it is the process's
# first, this host keeps the script (TclHost.thread_home) and Thread's errorproc logs a thread's
# error, which Thread wrote raw on stderr.
# It returns the command's result: Tcl gives that of a leave trace to the next one (rootfiles.py's).
# Its `puts` to stdout and stderr is escaped as the script's is (tcl/output.py), a safe one's too,
# and so are those it creates (a safe one's, with a channel shared, or once marked trusted); one
# not safe gets threads.py's `thread::create` and `tpool::create` too.
proc ::tclmilter::py::bg_made {parent command code result op} {
    if {$code != 0 || ![string match "cr*" [lindex $command 1]]} { return $result }
    set path [list {*}$parent {*}$result]
    interp alias $path ::tclmilter::py::output {} ::tclmilter::py::output
    interp eval $path $::tclmilter::py::outputprelude
    interp alias $path ::tclmilter::py::bg_made {} ::tclmilter::py::bg_made $path
    interp eval $path [list trace add execution ::interp leave ::tclmilter::py::bg_made]
    if {[interp issafe $path]} { return $result }
    interp eval $path $::tclmilter::py::threadsprelude
    foreach name {bgerror threads thread_error poll_next} {
        interp alias $path ::tclmilter::py::$name {} ::tclmilter::py::$name
    }
    interp alias $path ::tclmilter::py::bghandle {} ::tclmilter::py::bghandle $path
    foreach name {bgerror threads_used thread_error trace_threads watch_threads} {
        set from [list interp eval [lindex $path 0]]
        set procedure [list proc $name [{*}$from [list ::tcl::info::args ::tclmilter::$name]] \
            [{*}$from [list ::tcl::info::body ::tclmilter::$name]]]
        interp eval $path [list ::tcl::namespace::eval ::tclmilter $procedure]
    }
    interp bgerror $path ::tclmilter::bgerror
    return $result
}

# The `interp bgerror` handler of the script's interpreter and of each it creates (path: that
# interpreter), called by their ::tclmilter::bgerror, which breaks when it answers 1 (a break
# passes no alias: this interpreter makes it an error). Tcl's own handler's work there
# (::tclmilter::py::background: the script's `bgerror` proc first, under the time limit), the
# rest to the log. It runs here, where no limit stops it: in the script's interpreter, once the
# limit stopped the script's `bgerror` proc or the handler itself, the handler failed and Tcl wrote
# its report raw on stderr ("error in background error handler:", the error's message in its
# errorInfo). Such a stop is logged, and the errors queued after it are dropped (break): the
# interpreter, stopped, would refuse the handler each, and Tcl write that report again.
# The time limit's own echo of a stop in `vwait` or `update` (TclHost._limit_echo) goes nowhere:
# the stop is reported once, by what was stopped.
proc ::tclmilter::py::bghandle {path message options} {
    set info [expr {[dict exists $options -errorinfo] ? [dict get $options -errorinfo] : ""}]
    if {[lindex [::tclmilter::py::limit_echo $message $info] 1] eq "1"} { return 0 }
    if {[catch {interp eval $path [list ::tclmilter::py::background $message $options]} result ropts]} {
        ::tclmilter::py::bgerror $result [dict get $ropts -errorinfo] $message
        return 1
    }
    lassign $result what message info result resultinfo
    switch -- $what {
        break { return 1 }
        unhandled { ::tclmilter::py::bgerror $message $info }
        failed {
            ::tclmilter::py::bgerror "bgerror failed to handle a background error: $result (the error: $message)" \
                $resultinfo
        }
    }
    return 0
}

# A code other than ok and error where Tcl's top level ends it, in Tcl's words: {message errorCode}.
# The one definition of them: the script's interpreter has it too (an alias), for the code a
# command run by ctx.tcl ends with (tclmilter.tcl's ::tclmilter::toplevel).
proc ::tclmilter::py::badcode {code} {
    if {$code == 3 || $code == 4} {
        set message "invoked \"[lindex {- - - break continue} $code]\" outside of a loop"
    } else {
        set message "command returned bad code: $code"
    }
    list $message [list TCL UNEXPECTED_RESULT_CODE $code]
}

# What a callback's code other than ok and error (callbacks.py's _checked caught it) makes where Tcl's top
# level ends it, as there: a `return` returns (with its own -code at its last level), break,
# continue and any other code are errors, in Tcl's words and errorCode, with the one frame Tcl writes
# (the command's first 150 bytes, in whole characters, and "..."). {0 result} or {1 message}, with
# ::errorInfo and ::errorCode set.
proc ::tclmilter::py::unexpected {code result options command} {
    if {$code == 2 && [dict get $options -level] == 1} {
        set code [dict get $options -code]
        if {$code == 0} { return [list 0 $result] }
    }
    set ::errorCode NONE
    if {[dict exists $options -errorcode]} { set ::errorCode [dict get $options -errorcode] }
    if {$code != 1} { lassign [::tclmilter::py::badcode $code] result ::errorCode }
    set shown $command
    if {[string bytelength $command] > 150} {
        set end 150
        while {[string bytelength [string range $command 0 $end-1]] > 150} { incr end -1 }
        set shown "[string range $command 0 $end-1]..."
    }
    set ::errorInfo "$result\n    while executing\n\"$shown\""
    list 1 $result
}

# Tcl's exit writes what every channel buffers before the process ends (Tcl_Finalize); the milter
# ends by other ways (a worker's os._exit, the end of `run`), so this does it: a script's log file
# keeps its last lines. Every channel but the standard three is made non-blocking first (their
# descriptors are shared with the process that started the milter: they stay blocking). A flush
# of a blocking socket waits until a stuck peer reads, of a blocking pipe until its program reads
# (`open "|sleep 600" w`: for ever, and the milter with it); deleting an interpreter closes its
# channels, and closing a blocking pipeline waits for its programs to end (`open "|tail -f log"`).
# Non-blocking, Tcl writes what can go now, queues the rest (written as the reader takes it,
# while the host services file events: TclScript.flush, for a bounded time) and detaches the
# programs. `ending` 0 (before a fork): the channels that were blocking are returned, to be made
# so again once the wait is over.
proc ::tclmilter::py::flush_all {child ending} {
    set switched {}
    foreach c [interp eval $child [list ::tcl::chan::names]] {
        if {$c ni {stdin stdout stderr}} {
            if {!$ending && ![catch {interp eval $child [list ::tclmilter::py::fconfigure $c -blocking]} b] && $b} {
                lappend switched $c
            }
            catch {interp eval $child [list ::tclmilter::py::fconfigure $c -blocking 0]}
        }
        catch {interp eval $child [list ::tcl::chan::flush $c]}
    }
    return $switched
}

# The script's channels whose output is queued, not written yet: {channel bytes pids} each (the
# pids of a pipeline's programs; Tcl's own `pid`, kept by OWN_PID).
proc ::tclmilter::py::queued {child} {
    set out {}
    foreach c [interp eval $child [list ::tcl::chan::names]] {
        if {$c in {stdin stdout stderr}
                || [catch {interp eval $child [list ::tcl::chan::pending output $c]} n] || $n <= 0} {
            continue
        }
        if {[catch {interp eval $child [list ::tclmilter::py::pid $c]} pids]} { set pids {} }
        lappend out [list $c $n $pids]
    }
    return $out
}

# Make the channels `flush_all` made non-blocking before a fork blocking again.
proc ::tclmilter::py::blocking {child channels} {
    foreach c $channels {
        catch {interp eval $child [list ::tclmilter::py::fconfigure $c -blocking 1]}
    }
}
"""

def kept_own(name: str) -> str:
    """Tcl code that keeps Tcl's own command ``name`` as ::tclmilter::py::NAME, where the
    milter's own code calls it, and imports it back into the global namespace, once in an
    interpreter (errors and errorInfo as Tcl's; only `namespace origin NAME` names the new
    place). A script's `rename NAME`, `proc NAME` or `rename NAME ""` then acts on the import:
    called by name, its own proc ran in the milter's checks, outside the callbacks' time
    limit, and one that looped hung every connection, or the stop. Tcl's `auto_import` is held
    aside while `namespace import` runs (Tcl runs it first when it exists): it loads the
    autoloader's index, evaluating every tclIndex on the auto_path with Tcl's own
    `auto_load_index`, here before rootfiles.py's checking one is in place (another user's ran
    as root). A safe interpreter has no `fconfigure`: hidden, it is left as it is."""
    return f"""
if {{![llength [::tcl::info::commands ::tclmilter::py::{name}]] && [llength [::tcl::info::commands ::{name}]]}} {{
    ::tcl::namespace::eval ::tclmilter::py {{ }}
    ::rename ::{name} ::tclmilter::py::{name}
    ::tcl::namespace::eval ::tclmilter::py {{ ::namespace export {name} }}
    if {{[llength [::tcl::info::commands ::auto_import]]}} {{
        ::rename ::auto_import ::tclmilter::py::auto_import
        ::namespace import ::tclmilter::py::{name}
        ::rename ::tclmilter::py::auto_import ::auto_import
    }} else {{
        ::namespace import ::tclmilter::py::{name}
    }}
    ::tcl::namespace::eval ::tclmilter::py {{ ::namespace export -clear }}
}}
"""


#: Evaluated in the script's interpreter before its script: `quiet` and `after_count` call Tcl's
#: own `after` (output.py's PRELUDE keeps `fconfigure`, for its `puts` and `flush_all`).
OWN_AFTER: Final = kept_own("after")
#: And `pid`, which `queued` calls to name a pipeline's programs.
OWN_PID: Final = kept_own("pid")
