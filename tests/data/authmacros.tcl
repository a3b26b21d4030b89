# What a script sees of SMTP AUTH: the {auth_*} macros at envfrom and at eom, stamped into the
# message as headers. ENVFROM_MACROS, if set, is the envfrom macro list asked for at negotiate.
package require TclMilter 1.0

proc negotiate { context version actions protocol } {
    if {[info exists ::env(ENVFROM_MACROS)]} {
        $context setsymlist envfrom $::env(ENVFROM_MACROS)
    }
    return SMFIS_CONTINUE
}

proc seen { context } {
    set values {}
    foreach name {{auth_authen} {auth_type} {auth_author} {auth_ssf}} {
        lappend values "$name=[$context getsymval "{$name}"]"
    }
    return [join $values "; "]
}

proc envfrom { context fromList } {
    $context setpriv envfrom [seen $context]
    return SMFIS_CONTINUE
}

proc eom { context } {
    $context addheader X-Auth-Envfrom [$context getpriv envfrom]
    $context addheader X-Auth-Eom [seen $context]
    return SMFIS_CONTINUE
}

milter register negotiate negotiate
milter register envfrom envfrom
milter register eom eom
milter main
