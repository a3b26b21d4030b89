# TclMilter 1.0 command set, hosted by pytclmilter.
#
# In the main interpreter the Python host has created ::tclmilter::py::milter,
# ::tclmilter::py::context, ::tclmilter::py::replacebody and
# ::tclmilter::py::privstarted before this file is sourced. They answer a list
# {ok value} or {error message errorCode}; the procs below turn that into a normal
# Tcl result or error (with the errorCode Tcl's C API sets, e.g. TCL WRONGARGS),
# because tkinter drops the message of an error raised inside a Python command.

::tcl::namespace::eval ::tclmilter {
    variable version 1.0
}

if {[llength [::tcl::info::commands ::tclmilter::py::milter]]} {
    proc ::milter {args} {
        set r [::tclmilter::py::milter {*}$args]
        if {[lindex $r 0] eq "suspend"} {
            # `milter main` under `pytclmilter run`: the host serves outside this script, which
            # waits here until the milter stops, then goes on with the result of serving (see
            # TclHost.start). A reload deletes a waiting script's interpreter: what follows its
            # `milter main` never runs. Called where Tcl cannot suspend the script (from a command
            # implemented in C), the milter serves inside this call instead; so it does in a
            # coroutine of the script's own, whose yield would return to the script, not the host.
            if {[::tcl::info::coroutine] ne "::tclmilter::py::script" || [catch {yield main} r]} {
                set r [::tclmilter::py::serve]
            }
        }
        if {[lindex $r 0] eq "error"} {
            return -code error -errorcode [lindex $r 2] [lindex $r 1]
        }
        return [lindex $r 1]
    }

    # Private data that the script sets stays here, as Tcl values: priv($id) is a dict per
    # connection. A body collected block by block with setpriv is then never copied into Python
    # and back. What a Python callback sets lives in Python (tcl/priv.py): a name missing here
    # is looked up there, and Python removes a name from here when it sets it. Python is told
    # when priv($id) is made, so that it asks here only about connections that have one.
    ::tcl::namespace::eval ::tclmilter {
        variable priv
        ::tcl::array::set priv {}
    }

    # Every context command is an alias of this proc with the connection id.
    proc ::tclmilter::context {id args} {
        switch -exact -- [lindex $args 0] {
            getpriv - setpriv {
                variable priv
                set n [llength $args]
                if {$n == 3 && [lindex $args 0] eq "setpriv"} {
                    if {![::tcl::info::exists priv($id)]} {
                        # (a live connection's only: an id the script made up is refused)
                        set r [::tclmilter::py::privstarted $id]
                        if {[lindex $r 0] eq "error"} {
                            return -code error -errorcode [lindex $r 2] [lindex $r 1]
                        }
                    }
                    ::tcl::dict::set priv($id) [lindex $args 1] [lindex $args 2]
                    return [lindex $args 2]
                }
                if {$n == 2 && [::tcl::info::exists priv($id)] && [::tcl::dict::exists $priv($id) [lindex $args 1]]} {
                    return [::tcl::dict::get $priv($id) [lindex $args 1]]
                }
                if {$n == 1 && [lindex $args 0] eq "getpriv"} {
                    set r [::tclmilter::py::context $id getpriv]
                    if {[lindex $r 0] eq "error"} {
                        return -code error -errorcode [lindex $r 2] [lindex $r 1]
                    }
                    if {[::tcl::info::exists priv($id)]} {
                        return [::tcl::dict::merge [lindex $r 1] $priv($id)]
                    }
                    return [lindex $r 1]
                }
            }
            unsetpriv {
                if {[llength $args] <= 2} {
                    ::tclmilter::unsetpriv $id {*}[lrange $args 1 end]
                }
            }
            replacebody {
                if {[llength $args] == 2} {
                    # Python fetches the bytes Tcl keeps the text in (tcl/strings.py makes wire
                    # bytes of them); as an argument they would be converted to text and back.
                    variable outgoing [::tcl::encoding::convertto identity [lindex $args 1]]
                    set r [::tclmilter::py::replacebody $id]
                    unset outgoing
                    if {[lindex $r 0] eq "error"} {
                        return -code error -errorcode [lindex $r 2] [lindex $r 1]
                    }
                    return [lindex $r 1]
                }
            }
        }
        set r [::tclmilter::py::context $id {*}$args]
        if {[lindex $r 0] eq "error"} {
            return -code error -errorcode [lindex $r 2] [lindex $r 1]
        }
        return [lindex $r 1]
    }

    # Remove this connection's private data matching the glob pattern (all without one) here;
    # Python's part is removed by the caller, through ::tclmilter::py::context.
    proc ::tclmilter::unsetpriv {id {pattern *}} {
        variable priv
        if {[::tcl::info::exists priv($id)]} {
            foreach name [::tcl::dict::keys $priv($id) $pattern] {
                ::tcl::dict::unset priv($id) $name
            }
        }
    }

    # For Python (tcl/priv.py): the private data set here, as the bytes Tcl keeps its text in.
    proc ::tclmilter::privbytes {id name} {
        variable priv
        ::tcl::encoding::convertto identity [::tcl::dict::get $priv($id) $name]
    }

    proc ::tclmilter::allprivbytes {id} {
        variable priv
        set all {}
        if {[::tcl::info::exists priv($id)]} {
            ::tcl::dict::for {name value} $priv($id) {
                lappend all [::tcl::encoding::convertto identity $name] [::tcl::encoding::convertto identity $value]
            }
        }
        return $all
    }

    proc ::tclmilter::forgetpriv {id {name ""}} {
        variable priv
        if {[llength [::tcl::info::level 0]] == 2} {
            unset -nocomplain priv($id)
        } elseif {[::tcl::info::exists priv($id)]} {
            ::tcl::dict::unset priv($id) $name
        }
    }

    # A command written in Python (a --python file's milter.tcl_command): every one is an alias
    # of this proc with its Python half, which answers {ok value}, {error message errorCode
    # errorInfo} or {limit} (tcl/pycommands.py).
    proc ::tclmilter::pycommand {command args} {
        if {[catch {$command {*}$args} r options]} {
            # Python raised as it entered the command (tkinter gives Tcl an empty error): if the
            # callback's time ran out, that was its limit, which no catch may take (below).
            if {[::tclmilter::py::ranout]} { while 1 {} }
            return -options $options $r
        }
        switch -exact -- [lindex $r 0] {
            ok {
                return [lindex $r 1]
            }
            error {
                return -code error -errorcode [lindex $r 2] -errorinfo [lindex $r 3] [lindex $r 1]
            }
        }
        # {limit}: the callback's time (-calltimeout) ran out in Python, and Tcl's deadline is now
        # set to now: its next check stops the callback, as for any callback over its limit.
        while 1 {}
    }

    # ctx.tcl and milter.tcl from Python (tcl/pycommands.py): the command at the global level, as
    # a callback runs, and its result as the bytes Tcl keeps its text in (or each element's).
    proc ::tclmilter::call {args} {
        if {[set code [catch {uplevel #0 $args} result options]]} {
            set result [::tclmilter::toplevel $code $result $options $args]
        }
        ::tcl::encoding::convertto identity $result
    }

    proc ::tclmilter::calllist {args} {
        if {[set code [catch {uplevel #0 $args} result options]]} {
            set result [::tclmilter::toplevel $code $result $options $args]
        }
        lmap element $result { ::tcl::encoding::convertto identity $element }
    }

    # A code other than ok, as Tcl's top level makes it: an error but for a `return` that ends at
    # this level. From a Python callback the host's call is at the top level, where Tcl does this
    # itself; from a Python command, inside a callback, it is not, and a `return -code break X`
    # came back as the result X. The errorInfo ends with the frames pycommands.py cuts off there.
    proc ::tclmilter::toplevel {code result options command} {
        if {$code == 2} {
            if {[::tcl::dict::get $options -level] == 1} { set code [::tcl::dict::get $options -code] }
            if {$code == 0 || $code == 2} { return $result }  ;# (a return's return: as from a callback)
            ::tcl::dict::set options -level 0
            ::tcl::dict::set options -code $code
        }
        if {$code == 1} { return -options $options $result }
        lassign [::tclmilter::py::badcode $code] result errorcode
        return -code error -errorcode $errorcode -errorinfo \
            "$result\n    while executing\n\"$command\"\n    (\"uplevel\" body line 1)\n    invoked from within\n\"uplevel #0 \$args\"" \
            $result
    }

    # Errors of `after` and `fileevent` handlers, as Tcl's own handler treats them: the script's
    # bgerror proc if it has one (its break drops the errors queued after, as in Tcl); but what
    # Tcl would print raw on stderr goes to the log, escaped and with its errorInfo. That is the
    # host's work (py::bghandle, in its interpreter: the time limit cannot stop it halfway).
    proc ::tclmilter::bgerror {message options} {
        if {[::tclmilter::py::bghandle $message $options]} { return -code break }
    }
    if {[llength [::tcl::info::commands ::tclmilter::py::bghandle]]} {
        interp bgerror {} ::tclmilter::bgerror
    }

    # Thread evaluates what threads send to this thread in the interpreter that ran the
    # thread's first thread:: command, for as long as the process lives (it never learns that an
    # interpreter was deleted). So the first thread:: or tpool:: command here asks the host
    # first, which then keeps this interpreter and refuses to replace it by a reload (TclHost
    # thread_home), or refuses the command if an earlier interpreter holds that place; then it
    # tells secondary threads where `milter stop` goes (TclMilter 1.0 allowed exactly that).
    proc ::tclmilter::threads_used {args} {
        set r [::tclmilter::py::threads]
        if {[lindex $r 0] ne "ok"} {
            return -code error [lindex $r 1]
        }
        ::tclmilter::trace_threads remove
        tsv::set ::tclmilter main [thread::id]
        # An error with no caller to return it to (an -async send's, a thread's own script's) is
        # logged, escaped, where Thread wrote it raw on stderr; unless the script has its own
        # errorproc (Thread has one for the process: the script's, set after this, wins).
        if {[thread::errorproc] eq ""} {
            thread::errorproc ::tclmilter::thread_error
        }
    }

    # Thread's errorproc: runs in this interpreter when its thread runs Tcl's event loop. It must
    # not fail: Thread would report its error to it again, for ever.
    proc ::tclmilter::thread_error {thread info} {
        catch {::tclmilter::py::thread_error $thread $info}
        return
    }

    proc ::tclmilter::trace_threads {op} {
        foreach cmd [concat [::tcl::info::commands ::thread::*] [::tcl::info::commands ::tpool::*]] {
            trace $op execution $cmd enter ::tclmilter::threads_used
        }
    }

    # The traces, once Thread's commands are here: in this interpreter now, and in one the
    # script creates when it loads Thread (threads.py's `load` trace calls this). Once only:
    # threads_used removes them at the first use.
    proc ::tclmilter::watch_threads {} {
        variable threads_watched
        if {![::tcl::info::exists threads_watched] && [llength [::tcl::info::commands ::thread::id]]
                && [llength [::tcl::info::commands ::tclmilter::py::threads]]} {
            set threads_watched 1
            ::tclmilter::trace_threads add
        }
    }

    if {![catch {package require Thread}]} {
        ::tclmilter::watch_threads
    }
} else {
    # A secondary thread or a foreign interpreter: only `milter stop` works here.
    proc ::milter {args} {
        if {[llength $args] == 0} {
            return -code error -errorcode {TCL WRONGARGS} "wrong # args: should be \"milter option ?arg ...?\""
        }
        set sub [lindex $args 0]
        if {$sub ni {configure main register stop}} {
            # Tcl's own answer to an unknown subcommand first, as in the script's interpreter
            return -code error -errorcode [list TCL LOOKUP INDEX option $sub] \
                "bad option \"$sub\": must be configure, main, register, or stop"
        }
        if {$sub ne "stop"} {
            return -code error "milter $sub: only \"milter stop\" works outside the main interpreter"
        }
        if {[llength $args] != 1} {
            return -code error -errorcode {TCL WRONGARGS} "wrong # args: should be \"milter stop\""
        }
        if {[catch {package require Thread}] || ![tsv::exists ::tclmilter main]} {
            return -code error "milter stop: no running pytclmilter interpreter to stop"
        }
        thread::send -async [tsv::get ::tclmilter main] {::milter stop}
        return
    }
}

package provide TclMilter 1.0
