/*
 * sample_milter.c -- a small filter on Sendmail's own libmilter, to check that
 * `pytclmilter send` talks to any milter, not just to pytclmilter.
 *
 *   - rejects the envelope sender given on the command line at MAIL FROM
 *     (550 5.7.1 Sender rejected by sample_milter);
 *   - adds "X-Sample-Milter: yes" to every other message at end of message.
 *
 * Build and run (Debian: apt-get install libmilter-dev):
 *   gcc -o sample_milter sample_milter.c -lmilter -lpthread
 *   ./sample_milter inet:8895@127.0.0.1 spammer@spamdomain.com
 * It prints "sample_milter: listening on SPEC" once the socket is bound.
 */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <libmilter/mfapi.h>

static const char *rejected_sender = "";

static sfsistat sm_envfrom(SMFICTX *ctx, char **argv)
{
    const char *from = argv[0];        /* as the client wrote it: <a@b> */
    size_t len;

    if (from[0] == '<')
        from++;
    len = strlen(from);
    if (len > 0 && from[len - 1] == '>')
        len--;
    if (len == strlen(rejected_sender) && strncasecmp(from, rejected_sender, len) == 0) {
        smfi_setreply(ctx, "550", "5.7.1", "Sender rejected by sample_milter");
        return SMFIS_REJECT;
    }
    return SMFIS_CONTINUE;
}

static sfsistat sm_eom(SMFICTX *ctx)
{
    if (smfi_addheader(ctx, "X-Sample-Milter", "yes") != MI_SUCCESS)
        return SMFIS_TEMPFAIL;
    return SMFIS_CONTINUE;
}

static struct smfiDesc sample = {
    .xxfi_name = "SampleMilter",
    .xxfi_version = SMFI_VERSION,
    .xxfi_flags = SMFIF_ADDHDRS,
    .xxfi_envfrom = sm_envfrom,
    .xxfi_eom = sm_eom,
};

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s CONNECTION REJECTED-SENDER\n", argv[0]);
        return 64;
    }
    rejected_sender = argv[2];
    if (smfi_setconn(argv[1]) == MI_FAILURE || smfi_register(sample) == MI_FAILURE) {
        fprintf(stderr, "sample_milter: cannot set up %s\n", argv[1]);
        return 1;
    }
    if (smfi_opensocket(1) == MI_FAILURE) {
        fprintf(stderr, "sample_milter: cannot listen on %s\n", argv[1]);
        return 1;
    }
    printf("sample_milter: listening on %s\n", argv[1]);
    fflush(stdout);
    return smfi_main() == MI_SUCCESS ? 0 : 1;
}
