# Relay only for users who logged in (SMTP AUTH), and stamp who it was: the script of
# docs/deployment.md, run behind Postfix (tests/test_postfix_auth.py) and Sendmail
# (tests/test_sendmail_auth.py). A long macro name keeps its braces: {{auth_authen}}.
package require TclMilter 1.0
milter configure -name AuthPolicy

proc auth_envfrom { context fromList } {
    if {[$context getsymval {{auth_authen}}] eq ""} {
        $context setreply 550 5.7.1 "log in first: this server relays only for its users"
        return SMFIS_REJECT
    }
    return SMFIS_CONTINUE
}

proc auth_eom { context } {
    set value "[$context getsymval {{auth_authen}}] with [$context getsymval {{auth_type}}]"
    set author [$context getsymval {{auth_author}}]
    if {$author ne ""} {
        append value " for $author"
    }
    $context addheader X-Authenticated-User $value
    return SMFIS_CONTINUE
}

milter register envfrom auth_envfrom
milter register eom auth_eom
milter main
