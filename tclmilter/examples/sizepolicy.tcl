#!/usr/local/bin/tclsh
#
# sizepolicy.tcl -- a size and attachment policy that rewrites the body
#
# Every message is let through, but when its body is larger than $maxsize or
# it carries an attachment whose file name matches one of $forbidden (*.exe,
# *.scr, ...), the body is replaced with a short notice for the recipient,
# the Content-Type becomes text/plain and a header says what happened:
#
#   X-Size-Policy: body removed (attachment "invoice.exe" is not allowed)
#
# Attachment names are looked for in the name= and filename= parameters of
# Content-Type and Content-Disposition, both in the message's own headers
# (header callback) and in the MIME part headers inside the body; a quoted
# name may hold ";", and a name in RFC 2231 form (filename*=UTF-8''...,
# or split into filename*0=, filename*1=, ...) is put together and decoded,
# and so is a quoted name in RFC 2047 form (filename="=?UTF-8?B?...?=").
#
# The body arrives in blocks of up to 64 KB; the body callback collects them
# with setpriv and the checks run at end of message (the only place where a
# message may be changed). Optionally ($footer) a line of text is appended to
# plain-text messages that pass: replacebody of the collected blocks plus the
# footer gives the recipient the original bytes exactly (8-bit text, invalid
# UTF-8 and all), followed by the footer.
#
# Sizes are counted in characters with "string length": for MIME mail
# (base64 and quoted-printable are 7-bit) that is the number of bytes; an
# 8-bit UTF-8 body counts each character once.
#
# Options (after the script name; with pytclmilter put them after --):
#   -maxsize BYTES     largest body let through unchanged (default 10485760)
#   -forbid PATTERNS   glob patterns of forbidden file names, as one list
#                      (default: *.exe *.scr *.pif *.com *.bat *.cmd *.vbs *.js)
#   -footer TEXT       append this line to plain-text messages (default: none)
#
# Run it:
#   pytclmilter check sizepolicy.tcl
#   pytclmilter try sizepolicy.tcl message.eml
#   pytclmilter run sizepolicy.tcl -- -maxsize 5000000 -footer "Scanned by sizepolicy"
# and in Postfix's main.cf:  smtpd_milters = unix:/var/run/sizepolicy.sock
#

package require Tcl 8.6
package require TclMilter 1.0

# Configuration

set maxsize 10485760
set forbidden {*.exe *.scr *.pif *.com *.bat *.cmd *.vbs *.js}
set footer ""

foreach {option value} $argv {
    switch -- $option {
        -maxsize { set maxsize $value }
        -forbid  { set forbidden $value }
        -footer  { set footer $value }
        default {
            error "unknown option \"$option\": must be -maxsize, -forbid or -footer"
        }
    }
}
if {![string is integer -strict $maxsize] || $maxsize < 0} {
    error "-maxsize must be a number of bytes, not \"$maxsize\""
}

milter configure -name SizePolicy
milter configure -connection {unix:/var/run/sizepolicy.sock}

# File names given by the name= and filename= parameters of one header field:
# a quoted value may hold ";" and backslash escapes; the RFC 2231 forms
# (name*=charset'lang'text with %XX escapes, split into name*0, name*1, ...)
# are put together and decoded, so that "invoice" + ".exe" is seen whole

proc file_names { field } {
    # unfold the lines of a folded field (RFC 5322: a newline before white space)
    regsub -all {\r?\n} $field "" field
    set names {}
    foreach {all param section extended value} [regexp -all -inline -nocase \
            {((?:file)?name)(?:\*([0-9]+))?(\*?)\s*=\s*("(?:[^"\\]|\\.)*"|[^";]*)} $field] {
        if {[string index $value 0] == "\""} {
            regsub -all {\\(.)} [string range $value 1 end-1] {\1} value
        }
        set value [string trim $value]
        if {$section == "" && $extended == ""} {
            lappend names [rfc2047_decoded $value]
        } elseif {$section == ""} {
            lappend names [rfc2231_decoded $extended $value 1 charset]
        } else {
            # one section of a split value: put together below, in the order of their numbers
            lappend sections([string tolower $param]) [list $section $extended $value]
        }
    }
    foreach param [array names sections] {
        set name ""
        set charset ""
        set first 1
        foreach part [lsort -dictionary -index 0 $sections($param)] {
            foreach {section extended value} $part break
            append name [rfc2231_decoded $extended $value $first charset]
            set first 0
        }
        lappend names $name
    }
    return $names
}

# A parameter value as RFC 2231 gives it: with a "*" after the name it is
# percent-encoded, the first (or only) part starting with charset'language'

proc rfc2231_decoded { extended value first charsetVar } {
    upvar 1 $charsetVar charset
    if {$extended == ""} {
        return $value
    }
    if {$first && [regexp {^([^']*)'[^']*'(.*)$} $value -> charset value]} {
        set charset [string tolower $charset]
    }
    return [percent_decoded $value $charset]
}

# A quoted name written as RFC 2047 encoded words (filename="=?UTF-8?B?...?="):
# RFC 2047 does not allow them there, but Outlook and Gmail write non-ASCII
# names so and every mail client reads them, so "=?UTF-8?B?aW52b2ljZS5leGU=?="
# is an invoice.exe. White space between two encoded words is no part of the
# name. (binary decode is Tcl 8.6's.)

proc rfc2047_decoded { text } {
    set name ""
    set words 0
    while {[regexp {^(.*?)=\?([^?]+)\?([BbQq])\?([^?]*)\?=(.*)$} $text \
            -> before charset kind data text]} {
        if {!$words || [string trim $before] != ""} {
            append name $before
        }
        set charset [string tolower $charset]
        if {[string equal -nocase $kind b]} {
            if {[catch {binary decode base64 $data} bytes]} {
                set bytes $data
            }
            append name [in_charset $bytes $charset]
        } else {
            append name [percent_decoded [string map {_ " "} $data] $charset =]
        }
        set words 1
    }
    return $name$text
}

# The text of an RFC 2231 value: %XX escapes are bytes in the given charset
# (and of an RFC 2047 Q-encoded word: =XX)

proc percent_decoded { text charset {escape %} } {
    set bytes ""
    while {[regexp -indices "$escape\[0-9A-Fa-f\]\[0-9A-Fa-f\]" $text at]} {
        set i [lindex $at 0]
        append bytes [string range $text 0 [expr {$i - 1}]]
        append bytes [format %c [scan [string range $text [expr {$i + 1}] [expr {$i + 2}]] %x]]
        set text [string range $text [expr {$i + 3}] end]
    }
    append bytes $text
    return [in_charset $bytes $charset]
}

# Bytes as text of the given charset, when Tcl knows it

proc in_charset { bytes charset } {
    set encoding [string map {iso- iso us-ascii ascii} $charset]
    if {$encoding != "" && [lsearch -exact [encoding names] $encoding] >= 0} {
        return [encoding convertfrom $encoding $bytes]
    }
    return $bytes
}

# File names in the MIME part headers of a body

proc body_file_names { body } {
    set names {}
    set field ""
    foreach line [split [string map [list "\r\n" "\n"] $body] "\n"] {
        if {$field != "" && [regexp "^\[ \t\]" $line]} {
            # a continuation line of the field
            append field "\n" $line
            continue
        }
        if {$field != ""} {
            set names [concat $names [file_names $field]]
            set field ""
        }
        if {[regexp -nocase {^content-(type|disposition):} $line]} {
            set field $line
        }
    }
    if {$field != ""} {
        set names [concat $names [file_names $field]]
    }
    return $names
}

proc forbidden_name { names } {
    foreach name $names {
        foreach pattern $::forbidden {
            if {[string match -nocase $pattern $name]} {
                return $name
            }
        }
    }
    return ""
}

# Callbacks

proc sp_envfrom { context fromList } {
    # a new message: forget everything about the previous one
    $context unsetpriv msg_*
    $context setpriv msg_body ""
    $context setpriv msg_size 0
    $context setpriv msg_names {}
    $context setpriv msg_plain 1
    return SMFIS_CONTINUE
}

proc sp_header { context name data } {
    set name [string tolower $name]
    if {$name == "content-type" || $name == "content-disposition"} {
        $context setpriv msg_names [concat [$context getpriv msg_names] [file_names $data]]
    }
    if {$name == "content-type" && ![regexp -nocase {^\s*text/plain} $data]} {
        $context setpriv msg_plain 0
    }
    if {$name == "content-transfer-encoding" \
            && [regexp -nocase {base64|quoted-printable} $data]} {
        $context setpriv msg_plain 0
    }
    return SMFIS_CONTINUE
}

proc sp_body { context block } {
    set size [expr {[$context getpriv msg_size] + [string length $block]}]
    $context setpriv msg_size $size
    # once over the limit the body will be dropped anyway: stop collecting
    if {$size <= $::maxsize} {
        $context setpriv msg_body "[$context getpriv msg_body]$block"
    }
    return SMFIS_CONTINUE
}

proc sp_eom { context } {
    set size [$context getpriv msg_size]
    set body [$context getpriv msg_body]
    set reason ""

    if {$size > $::maxsize} {
        set reason "the body has $size bytes, more than the $::maxsize allowed"
        set short "body of $size bytes over the limit of $::maxsize"
    } else {
        set names [concat [$context getpriv msg_names] [body_file_names $body]]
        set bad [forbidden_name $names]
        if {$bad != ""} {
            # the notice is US-ASCII: a decoded name's other characters show as "?"
            regsub -all {[^ -~]} $bad ? bad
            set reason "it carried the attachment \"$bad\", a file type that is not accepted"
            set short "attachment \"$bad\" is not allowed"
        }
    }

    if {$reason != ""} {
        set notice [join [list \
            "This message was changed by the mail system's size and attachment policy." \
            "" \
            "Its original content was removed because $reason." \
            "Please ask the sender to share the content another way." \
            ""] "\r\n"]
        $context replacebody $notice
        # the notice is plain text: say so, and drop the old MIME structure
        $context chgheader Content-Type "text/plain; charset=us-ascii"
        $context chgheader Content-Transfer-Encoding ""
        $context addheader X-Size-Policy "body removed ($short)"
    } elseif {$::footer != "" && [$context getpriv msg_plain]} {
        # the blocks as received, then the footer: the original bytes come back unchanged
        $context replacebody "$body\r\n-- \r\n$::footer\r\n"
    }

    $context unsetpriv msg_*
    return SMFIS_CONTINUE
}

proc sp_abort { context } {
    $context unsetpriv msg_*
    return SMFIS_CONTINUE
}

# Register the callbacks and start up the filter

milter register envfrom sp_envfrom
milter register header sp_header
milter register body sp_body
milter register eom sp_eom
milter register abort sp_abort
milter main

# pytclmilter has removed its socket file by now (TclMilter 1.0 left it when run as root);
# where this user may not (--user, a directory of root's) pytclmilter has said so in the log,
# which is no reason for the stop to fail: hence the catch
if {[regexp {^(unix|local):(.+)$} [milter configure -connection] -> proto path]} {
    catch {file delete $path}
}
