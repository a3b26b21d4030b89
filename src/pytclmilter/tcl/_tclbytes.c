/* Wire bytes <-> the bytes Tcl 8.6 keeps a string's text in, one pass over the data each way.
 *
 * The rule is the README's "Bytes and text", as tcl/strings.py states it; its pure-Python
 * wire_to_tcl_python / tcl_to_wire_python give the same bytes for any input (tests compare them)
 * and serve where this module is not built. Python's codecs do the same work in several passes
 * and take their error path for every byte that is not UTF-8 (half the bytes of a binary part,
 * most of those of CP1251 text); here such a byte costs a table look-up, and the only branch
 * that depends on the data is taken for the few byte pairs that may begin a character
 * (docs/benchmarks.md, "8-bit bodies through a Tcl script").
 *
 * wire_to_tcl: valid UTF-8 (Python's strict rules: no overlongs, no surrogates, nothing beyond
 *   U+10FFFF) is kept, but for a character beyond U+FFFF, which becomes its CESU-8 surrogate pair
 *   as Tcl keeps it (Tcl's string tolower/toupper crash on the 4-byte form); NUL becomes C0 80
 *   (Tcl's NUL); any other byte b becomes the CESU-8 form of U+DC80+b, ED B2|B3 xx, which Tcl
 *   keeps through any string operation.
 * tcl_to_wire: the inverse, for any bytes: C0 80 -> NUL; a CESU-8 surrogate pair
 *   (ED A0..AF xx ED B0..BF xx, what Tcl writes for a character beyond U+FFFF when it rebuilds a
 *   string) -> that character in UTF-8; ED B2|B3 xx -> the byte; everything else kept.
 * Both return their argument itself when nothing changes (ASCII text, UTF-8 text).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define HIGH_BITS 0x8080808080808080ULL
#define LOW_BITS 0x0101010101010101ULL

/* The high bit of each byte of the word (8 bytes in memory order) that is zero or has its high
 * bit set; exact up to and including the first such byte, which is what plain_bytes reads. */
static inline uint64_t
stop_bits(uint64_t v)
{
    return (v | ((v - LOW_BITS) & ~v)) & HIGH_BITS;
}

/* How many bytes of the word come before the first that has a bit in these stop bits (not 0). */
static inline Py_ssize_t
plain_bytes(uint64_t stops)
{
#if defined(__GNUC__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    return __builtin_ctzll(stops) >> 3;
#else
    (void)stops;
    return 0;  /* (the byte-wise way then takes each) */
#endif
}

static inline int
is_cont(unsigned char c)
{
    return (c & 0xC0) == 0x80;
}

/* The length of the valid UTF-8 character of 2 to 4 bytes at p, or 0 if none starts there. */
static inline Py_ssize_t
utf8_char(const unsigned char *p, const unsigned char *end)
{
    unsigned char c = p[0], lo = 0x80, hi = 0xBF;
    Py_ssize_t left = end - p;

    if (c < 0xC2 || c > 0xF4)  /* continuation bytes, overlong C0/C1, beyond U+10FFFF */
        return 0;
    if (c < 0xE0)
        return left >= 2 && is_cont(p[1]) ? 2 : 0;
    if (c < 0xF0) {
        if (c == 0xE0)
            lo = 0xA0;  /* overlong below */
        else if (c == 0xED)
            hi = 0x9F;  /* U+D800..U+DFFF are not UTF-8 */
        return left >= 3 && p[1] >= lo && p[1] <= hi && is_cont(p[2]) ? 3 : 0;
    }
    if (c == 0xF0)
        lo = 0x90;
    else if (c == 0xF4)
        hi = 0x8F;
    return left >= 4 && p[1] >= lo && p[1] <= hi && is_cont(p[2]) && is_cont(p[3]) ? 4 : 0;
}

/* The bytes of arg, from *src to *end; 0 with TypeError if arg is not bytes. */
static int
bytes_arg(PyObject *arg, const char *function, const unsigned char **src, const unsigned char **end)
{
    if (!PyBytes_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "%s() needs bytes, not %.100s", function, Py_TYPE(arg)->tp_name);
        return 0;
    }
    *src = (const unsigned char *)PyBytes_AS_STRING(arg);
    *end = *src + PyBytes_GET_SIZE(arg);
    return 1;
}

/* What wire_to_tcl makes of a byte that begins no valid character: its bytes in Tcl (the byte
 * itself, C0 80 for NUL, ED B2|B3 xx for 80..FF) in the low 32 bits, in memory order, and how
 * many they are in the top byte: one look-up a byte. */
static uint64_t BYTE_FORM[256];
static unsigned char MAY_LEAD[256];  /* C2..F4: a byte that may begin a character */

static void
make_tables(void)
{
    for (int b = 0; b < 256; b++) {
        unsigned char out[4] = {(unsigned char)b, 0, 0, 0};
        uint64_t len = 1;
        uint32_t word;
        if (b == 0) {
            out[0] = 0xC0, out[1] = 0x80, len = 2;
        }
        else if (b >= 0x80) {
            out[0] = 0xED, out[1] = b < 0xC0 ? 0xB2 : 0xB3, out[2] = 0x80 | (b & 0x3F), len = 3;
        }
        memcpy(&word, out, 4);
        BYTE_FORM[b] = word | len << 56;
        MAY_LEAD[b] = b >= 0xC2 && b <= 0xF4;
    }
}

/* Write the form of byte c at o (4 bytes: the caller leaves room) and give its length. */
static inline Py_ssize_t
put_form(unsigned char *o, unsigned char c)
{
    uint64_t form = BYTE_FORM[c];
    uint32_t word = (uint32_t)form;
    memcpy(o, &word, 4);
    return (Py_ssize_t)(form >> 56);
}

/* No valid UTF-8 character of 2 to 4 bytes begins in these 8 bytes (in memory order), the byte
 * after them being next: none of C0..FF is followed by one of 80..BF. (False does not mean one
 * does: C0, C1 and F5..FF begin none.) */
static inline int
no_character_starts(uint64_t v, unsigned char next)
{
#if defined(__GNUC__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    uint64_t lead = v & (v << 1) & HIGH_BITS, cont = v & ~(v << 1) & HIGH_BITS;
    return ((lead << 8) & cont) == 0 && !((lead >> 63) && is_cont(next));
#else
    (void)v, (void)next;
    return 0;
#endif
}

/* The bytes from p to stop, and the rest of a character that begins before stop: a valid
 * character is kept, any other byte gets its form. Only a byte C2..F4 followed by a continuation
 * byte can begin a character; in random bytes one pair in 20 is such, so the branch is seldom
 * taken, and the processor guesses it right. */
/* A character beyond U+FFFF, its 4 bytes of UTF-8 at p, as the CESU-8 of its surrogate pair. */
static inline Py_ssize_t
put_pair(unsigned char *o, const unsigned char *p)
{
    uint32_t cp = ((uint32_t)(p[0] & 0x07) << 18) | ((uint32_t)(p[1] & 0x3F) << 12)
                  | ((uint32_t)(p[2] & 0x3F) << 6) | (uint32_t)(p[3] & 0x3F);
    uint32_t high = 0xD800 + ((cp - 0x10000) >> 10), low = 0xDC00 + ((cp - 0x10000) & 0x3FF);

    o[0] = 0xED;
    o[1] = (unsigned char)(0x80 | ((high >> 6) & 0x3F));
    o[2] = (unsigned char)(0x80 | (high & 0x3F));
    o[3] = 0xED;
    o[4] = (unsigned char)(0x80 | ((low >> 6) & 0x3F));
    o[5] = (unsigned char)(0x80 | (low & 0x3F));
    return 6;
}

static inline const unsigned char *
exact_bytes(const unsigned char *p, const unsigned char *stop, const unsigned char *end,
            unsigned char **op)
{
    unsigned char *o = *op;
    Py_ssize_t k;

    while (p < stop) {
        /* one branch, not two: a value, not && (p[1] is there but for the last byte) */
        unsigned next = end - p >= 2 ? p[1] : 0;
        if ((MAY_LEAD[*p] & (((next ^ 0x80) & 0xC0) == 0)) && (k = utf8_char(p, end)) != 0) {
            if (k == 4) {
                o += put_pair(o, p);
            }
            else {
                memcpy(o, p, (size_t)k);
                o += k;
            }
            p += k;
        }
        else {
            o += put_form(o, *p);
            p++;
        }
    }
    *op = o;
    return p;
}

/* Where the bytes from p on stop being valid UTF-8 without NUL: what wire_to_tcl keeps. */
static const unsigned char *
wire_plain_end(const unsigned char *p, const unsigned char *end)
{
    Py_ssize_t k;
    uint64_t v;

    while (p < end) {
        while (end - p >= 8) {
            memcpy(&v, p, 8);
            if ((v = stop_bits(v)) != 0) {
                p += plain_bytes(v);
                break;
            }
            p += 8;
        }
        if (p == end)
            break;
        if (*p != 0 && *p < 0x80) {
            p++;
            continue;
        }
        if (*p == 0 || (k = utf8_char(p, end)) == 0 || k == 4)
            break;
        p += k;
    }
    return p;
}

static PyObject *
wire_to_tcl(PyObject *module, PyObject *arg)
{
    const unsigned char *src, *p, *end;
    unsigned char *out, *o;
    Py_ssize_t n, kept;
    PyObject *result;
    uint64_t v;

    if (!bytes_arg(arg, "wire_to_tcl", &src, &end))
        return NULL;
    n = end - src;
    p = wire_plain_end(src, end);
    if (p == end) {
        Py_INCREF(arg);
        return arg;
    }
    kept = p - src;
    if (n - kept > (PY_SSIZE_T_MAX - kept - 1) / 3)
        return PyErr_NoMemory();
    /* at most 3 for 1, and 1 more: put_form writes 4 bytes */
    result = PyBytes_FromStringAndSize(NULL, kept + 3 * (n - kept) + 1);
    if (result == NULL)
        return NULL;
    out = (unsigned char *)PyBytes_AS_STRING(result);
    memcpy(out, src, kept);
    o = out + kept;
    /* 8 bytes at a time: ASCII text is copied; 8-bit text (Latin-1, CP1251) or random bytes in
     * which no UTF-8 character can begin are each given their form, with no branch; other words
     * take the exact way. */
    while (end - p >= 16) {
        memcpy(&v, p, 8);
        if (stop_bits(v) == 0) {
            memcpy(o, &v, 8);
            o += 8;
            p += 8;
        }
        else if (no_character_starts(v, p[8])) {
            for (int i = 0; i < 8; i++)
                o += put_form(o, p[i]);
            p += 8;
        }
        else {
            p = exact_bytes(p, p + 8, end, &o);
        }
    }
    exact_bytes(p, end, end, &o);
    if (_PyBytes_Resize(&result, o - out) < 0)
        return NULL;
    return result;
}

/* The number of bytes of the Tcl form at p that tcl_to_wire rewrites (0: the byte is kept), and
 * what they become in *byte (C0 80, ED B2|B3 xx) or *cp (a surrogate pair). */
static inline int
tcl_escape(const unsigned char *p, const unsigned char *end, unsigned char *byte, uint32_t *cp)
{
    Py_ssize_t left = end - p;

    if (p[0] == 0xC0) {
        if (left >= 2 && p[1] == 0x80) {
            *byte = 0;
            return 2;
        }
        return 0;
    }
    if (p[0] != 0xED || left < 3 || !is_cont(p[2]))
        return 0;
    if (p[1] >= 0xA0 && p[1] <= 0xAF) {
        if (left >= 6 && p[3] == 0xED && p[4] >= 0xB0 && p[4] <= 0xBF && is_cont(p[5])) {
            uint32_t high = 0xD000 | ((p[1] & 0x3F) << 6) | (p[2] & 0x3F);
            uint32_t low = 0xD000 | ((p[4] & 0x3F) << 6) | (p[5] & 0x3F);
            *cp = 0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00);
            return 6;
        }
        return 0;
    }
    if (p[1] == 0xB2 || p[1] == 0xB3) {
        *byte = (unsigned char)(p[2] + (p[1] - 0xB2) * 0x40);
        return 3;
    }
    return 0;
}

/* Where the first byte that tcl_to_wire rewrites is, from p on (end if none). */
static const unsigned char *
tcl_plain_end(const unsigned char *p, const unsigned char *end)
{
    unsigned char byte;
    uint32_t cp;
    uint64_t v;

    while (p < end) {
        while (end - p >= 8) {
            memcpy(&v, p, 8);
            if ((v &= HIGH_BITS) != 0) {
                p += plain_bytes(v);
                break;
            }
            p += 8;
        }
        if (p == end)
            break;
        if ((*p == 0xC0 || *p == 0xED) && tcl_escape(p, end, &byte, &cp))
            break;
        p++;
    }
    return p;
}

static PyObject *
tcl_to_wire(PyObject *module, PyObject *arg)
{
    const unsigned char *src, *p, *end;
    unsigned char *out, *o, byte = 0;
    uint32_t cp = 0;
    Py_ssize_t n, kept;
    PyObject *result;
    uint64_t v;
    int k;

    if (!bytes_arg(arg, "tcl_to_wire", &src, &end))
        return NULL;
    n = end - src;
    p = tcl_plain_end(src, end);
    if (p == end) {
        Py_INCREF(arg);
        return arg;
    }
    kept = p - src;
    result = PyBytes_FromStringAndSize(NULL, n);  /* every rewrite makes fewer bytes */
    if (result == NULL)
        return NULL;
    out = (unsigned char *)PyBytes_AS_STRING(result);
    memcpy(out, src, kept);
    o = out + kept;
    while (p < end) {
        while (end - p >= 8) {  /* a run of ASCII text goes 8 bytes at a time */
            memcpy(&v, p, 8);
            memcpy(o, &v, 8);  /* (there is room: the output is never longer than the input) */
            if ((v &= HIGH_BITS) != 0) {
                k = (int)plain_bytes(v);
                o += k;
                p += k;
                break;
            }
            o += 8;
            p += 8;
        }
        /* A run of escaped bytes (8-bit text): the step is always 3, so the processor can read
         * ahead while it checks that the run goes on. */
        while (end - p >= 3 && p[0] == 0xED && (p[1] & 0xFE) == 0xB2 && is_cont(p[2])) {
            *o++ = (unsigned char)(p[2] + ((p[1] & 1) << 6));
            p += 3;
        }
        if (p == end)
            break;
        if ((*p != 0xC0 && *p != 0xED) || (k = tcl_escape(p, end, &byte, &cp)) == 0) {
            *o++ = *p++;
        }
        else if (k < 6) {
            *o++ = byte;
            p += k;
        }
        else {
            *o++ = (unsigned char)(0xF0 | (cp >> 18));
            *o++ = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
            *o++ = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
            *o++ = (unsigned char)(0x80 | (cp & 0x3F));
            p += k;
        }
    }
    if (_PyBytes_Resize(&result, o - out) < 0)
        return NULL;
    return result;
}

/* The text of bytes that are ASCII without NUL, which Tcl takes as they are; None for any other
 * bytes. One pass that copies while it checks and stops at the first other byte: no second pass
 * over a block the cache no longer holds, and no exception (with its copy of the block) for a
 * block that is not ASCII. */
static PyObject *
ascii_text(PyObject *module, PyObject *arg)
{
    const unsigned char *src, *p, *end;
    unsigned char *out;
    PyObject *result;
    uint64_t v;

    if (!bytes_arg(arg, "ascii_text", &src, &end))
        return NULL;
    if (end > src && (*src == 0 || *src >= 0x80))  /* an 8-bit block usually shows it at once */
        Py_RETURN_NONE;
    result = PyUnicode_New(end - src, 127);
    if (result == NULL)
        return NULL;
    out = (unsigned char *)PyUnicode_DATA(result);
    p = src;
    for (; end - p >= 32; p += 32, out += 32) {  /* four words a step: as fast as Python's decoder */
        uint64_t w[4];
        memcpy(w, p, 32);
        if ((stop_bits(w[0]) | stop_bits(w[1]) | stop_bits(w[2]) | stop_bits(w[3])) != 0)
            goto other;
        memcpy(out, w, 32);
    }
    for (; end - p >= 8; p += 8, out += 8) {
        memcpy(&v, p, 8);
        if (stop_bits(v) != 0)
            goto other;
        memcpy(out, &v, 8);
    }
    for (; p < end; p++, out++) {
        if (*p == 0 || *p >= 0x80)
            goto other;
        *out = *p;
    }
    return result;
other:
    Py_DECREF(result);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"ascii_text", ascii_text, METH_O,
     "The text of bytes that are ASCII without NUL; None for any other bytes."},
    {"wire_to_tcl", wire_to_tcl, METH_O,
     "The bytes Tcl keeps for the text of these wire bytes (encoding convertfrom identity)."},
    {"tcl_to_wire", tcl_to_wire, METH_O,
     "Wire bytes for the text Tcl keeps in these bytes (encoding convertto identity)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pytclmilter.tcl._tclbytes",
    "Wire bytes <-> the bytes Tcl keeps text in, in one pass (see tcl/strings.py).", -1, methods,
};

PyMODINIT_FUNC
PyInit__tclbytes(void)
{
    make_tables();
    return PyModule_Create(&module);
}
