/* The header lines that cross the hop, joined in one pass (balancer/hop_headers.py says which and why).

   strip(headers, dropped) -> (lines, held)
     headers  a list of (name, value) pairs of bytes, as the parsers give them
     dropped  a tuple of lower-case names that do not cross
   lines is every other header as "Name: value\r\n", in order, joined; held is [(index in dropped, value)] for
   the headers that did not cross, in order, so the caller can read Host, Connection or Content-Length from them.
   Names compare without regard to ASCII case, as bytes.lower() does; `dropped` is scanned for each header, so
   it is meant for the callers' fixed sets of a dozen names (at most 64).

   In Python (balancer.hop_headers.python_strip, which runs where this is not built) each header costs a
   lower-case copy of its name, a set lookup and a formatted line. Here the name is compared in place and the
   lines are copied once into the bytes returned. With it, forwarded_headers and returned_answer went from 12,089
   to 8,730 instructions per request, and the default balancer's process from 70,353 to 66,999
   (`python -m bench.instructions --functions default`); `python -m bench.compare --base 7d34ae1` (both on one
   core) gave 2.3 % less CPU per request. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define MAX_DROPPED 64  /* the callers' fixed sets; a Connection header's own list goes through Python */

static int lower(int byte) {
    return byte >= 'A' && byte <= 'Z' ? byte + ('a' - 'A') : byte;
}

struct name {
    const char *text;  /* header names in lower case (compared without case); methods as sent */
    Py_ssize_t length;
};

#define NAME(text) {text, sizeof(text) - 1}

static const struct name CONTENT_LENGTH = NAME("content-length");

/* Whether `length` bytes at `name` are `wanted` in any ASCII case. */
static int named(const unsigned char *name, Py_ssize_t length, struct name wanted) {
    if (length != wanted.length) {
        return 0;
    }
    for (Py_ssize_t at = 0; at < length; at++) {
        if (lower(name[at]) != (unsigned char)wanted.text[at]) {
            return 0;
        }
    }
    return 1;
}

/* The index in `dropped` (lower-case names) of the name (`length` bytes at `name`, any case), or -1. */
static Py_ssize_t find(const unsigned char *name, Py_ssize_t length, PyObject *dropped) {
    for (Py_ssize_t index = 0; index < PyTuple_GET_SIZE(dropped); index++) {
        PyObject *candidate = PyTuple_GET_ITEM(dropped, index);
        if (named(name, length, (struct name){PyBytes_AS_STRING(candidate), PyBytes_GET_SIZE(candidate)})) {
            return index;
        }
    }
    return -1;
}

static PyObject *strip(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyList_Check(args[0]) || !PyTuple_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "strip(headers: list, dropped: tuple)");
        return NULL;
    }
    PyObject *headers = args[0], *dropped = args[1];
    Py_ssize_t dropped_count = PyTuple_GET_SIZE(dropped);
    if (dropped_count > MAX_DROPPED) {
        PyErr_Format(PyExc_ValueError, "at most %d dropped names, got %zd", MAX_DROPPED, dropped_count);
        return NULL;
    }
    for (Py_ssize_t index = 0; index < dropped_count; index++) {
        PyObject *name = PyTuple_GET_ITEM(dropped, index);
        if (!PyBytes_Check(name)) {
            PyErr_Format(PyExc_TypeError, "dropped[%zd] is not bytes", index);
            return NULL;
        }
    }
    Py_ssize_t count = PyList_GET_SIZE(headers);
    /* First pass: check every pair, decide which cross, and size the lines. */
    char stack_keep[32];
    char *keep = count <= (Py_ssize_t)sizeof(stack_keep) ? stack_keep : PyMem_Malloc(count);
    if (keep == NULL) {
        return PyErr_NoMemory();
    }
    PyObject *held = PyList_New(0), *lines = NULL, *result = NULL;
    if (held == NULL) {
        goto done;
    }
    Py_ssize_t size = 0;
    for (Py_ssize_t index = 0; index < count; index++) {
        PyObject *pair = PyList_GET_ITEM(headers, index);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2 || !PyBytes_Check(PyTuple_GET_ITEM(pair, 0))
                || !PyBytes_Check(PyTuple_GET_ITEM(pair, 1))) {
            PyErr_Format(PyExc_TypeError, "headers[%zd] is not a (name, value) pair of bytes", index);
            goto done;
        }
        PyObject *name = PyTuple_GET_ITEM(pair, 0), *value = PyTuple_GET_ITEM(pair, 1);
        Py_ssize_t position = find((const unsigned char *)PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name), dropped);
        keep[index] = position < 0;
        if (position < 0) {
            size += PyBytes_GET_SIZE(name) + PyBytes_GET_SIZE(value) + 4;  /* ": " and CRLF */
            continue;
        }
        PyObject *entry = PyTuple_New(2);
        PyObject *index_object = PyLong_FromSsize_t(position);  /* a small int: cached, not allocated */
        if (entry == NULL || index_object == NULL) {
            Py_XDECREF(entry);
            Py_XDECREF(index_object);
            goto done;
        }
        PyTuple_SET_ITEM(entry, 0, index_object);
        PyTuple_SET_ITEM(entry, 1, Py_NewRef(value));
        int appended = PyList_Append(held, entry);
        Py_DECREF(entry);
        if (appended < 0) {
            goto done;
        }
    }
    lines = PyBytes_FromStringAndSize(NULL, size);
    if (lines == NULL) {
        goto done;
    }
    char *out = PyBytes_AS_STRING(lines);
    for (Py_ssize_t index = 0; index < count; index++) {
        if (!keep[index]) {
            continue;
        }
        PyObject *pair = PyList_GET_ITEM(headers, index);
        PyObject *name = PyTuple_GET_ITEM(pair, 0), *value = PyTuple_GET_ITEM(pair, 1);
        memcpy(out, PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name));
        out += PyBytes_GET_SIZE(name);
        *out++ = ':';
        *out++ = ' ';
        memcpy(out, PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value));
        out += PyBytes_GET_SIZE(value);
        *out++ = '\r';
        *out++ = '\n';
    }
    result = PyTuple_Pack(2, lines, held);
done:
    if (keep != stack_keep) {
        PyMem_Free(keep);
    }
    Py_XDECREF(lines);
    Py_XDECREF(held);
    return result;
}

/* Whole messages in one call, where httptools would call back into Python for the URL, every header, the body
   and the message's end (each callback a method lookup and a call):

   parse_request(data, max_head) -> (method, target, headers, body) or None
   parse_response(data) -> (status, headers, body) or None

   Each answers only for one message complete in `data` with nothing after it, in the plain form clients and
   model servers send: HTTP/1.1; header lines of a token name, a colon and a non-empty value of visible ASCII,
   spaces and tabs (leading ones skipped, as llhttp does; none trailing); at most one Content-Length, of digits,
   and exactly that many bytes of body after the headers (none without it); and none of the headers that
   change how the message is framed or whether the connection stays open (Transfer-Encoding, Connection,
   Proxy-Connection; in a request also Expect and Upgrade). A request also needs one of the usual methods, a
   target in origin form ("/..." of URI characters, no fragment) and at most `max_head` bytes before its body;
   a response a status from 200 to 599 other than 204 and 304, and a Content-Length. headers is a list of
   (name, value) pairs of bytes, as httptools reports them; the connection stays open.

   Anything else gives None, and the caller feeds the same bytes to httptools, which handles every form (and
   the limits and errors around them). So where these answer, they must answer as httptools does:
   tests/test_parse_messages.py checks that on tens of thousands of random messages. */

#define MAX_FAST_HEADERS 32
#define MAX_LENGTH_DIGITS 15

/* Character classes, one table lookup per byte (filled when the module loads). The scans below need no bounds
   check: a bytes object's text is followed by a NUL, which is in no class and ends every scan, and a CR or LF
   they then look for is never that NUL (so the byte after a CR is at most that NUL, also in bounds). */
enum { TOKEN = 1, TEXT = 2, TARGET = 4 };
static unsigned char classes[256];

static void fill_classes(void) {
    for (int byte = 0; byte < 256; byte++) {
        int alphanumeric = (byte >= 'a' && byte <= 'z') || (byte >= 'A' && byte <= 'Z') || (byte >= '0' && byte <= '9');
        classes[byte] = (unsigned char)(
            (alphanumeric || (byte && strchr("!#$%&'*+-.^_`|~", byte)) ? TOKEN : 0)
            | (byte == '\t' || (byte >= ' ' && byte <= '~') ? TEXT : 0)  /* visible ASCII, space, tab */
            | (alphanumeric || (byte && strchr("-._~:/?[]@!$&'()*+,;=%", byte)) ? TARGET : 0));  /* RFC 3986, no '#' */
    }
}

struct span {
    Py_ssize_t start, length;
};

struct head {
    struct span names[MAX_FAST_HEADERS], values[MAX_FAST_HEADERS];
    int count;
    long long content_length;  /* -1: no Content-Length */
};

/* The header lines from *at through the empty line that ends them, in the plain form (see above); `refused` the
   lower-case names that leave the message to httptools (NULL-terminated). 1 with *at after the empty line, or 0. */
static int header_lines(const unsigned char *text, Py_ssize_t *at_io, const struct name *refused, struct head *head) {
    Py_ssize_t at = *at_io;
    head->count = 0;
    head->content_length = -1;
    for (;;) {
        if (text[at] == '\r' && text[at + 1] == '\n') {
            *at_io = at + 2;
            return 1;
        }
        if (head->count == MAX_FAST_HEADERS) {
            return 0;
        }
        Py_ssize_t name_start = at;
        while (classes[text[at]] & TOKEN) {
            at++;
        }
        if (at == name_start || text[at] != ':') {
            return 0;
        }
        Py_ssize_t name_length = at - name_start;
        at++;
        while (text[at] == ' ' || text[at] == '\t') {
            at++;
        }
        Py_ssize_t value_start = at;
        while (classes[text[at]] & TEXT) {
            at++;
        }
        Py_ssize_t value_length = at - value_start;
        if (text[at] != '\r' || text[at + 1] != '\n' || value_length == 0 || text[at - 1] == ' '
                || text[at - 1] == '\t') {
            return 0;
        }
        at += 2;
        const unsigned char *name = text + name_start;
        if (named(name, name_length, CONTENT_LENGTH)) {
            if (head->content_length >= 0 || value_length > MAX_LENGTH_DIGITS) {
                return 0;
            }
            long long length = 0;
            for (Py_ssize_t digit = value_start; digit < value_start + value_length; digit++) {
                if (text[digit] < '0' || text[digit] > '9') {
                    return 0;
                }
                length = length * 10 + (text[digit] - '0');
            }
            head->content_length = length;
        }
        for (const struct name *other = refused; other->text != NULL; other++) {
            if (named(name, name_length, *other)) {
                return 0;
            }
        }
        head->names[head->count] = (struct span){name_start, name_length};
        head->values[head->count] = (struct span){value_start, value_length};
        head->count++;
    }
}

/* The (name, value) list of `head`'s headers, as new bytes; NULL with an exception set. */
static PyObject *header_list(const unsigned char *text, const struct head *head) {
    PyObject *headers = PyList_New(head->count);
    if (headers == NULL) {
        return NULL;
    }
    for (int index = 0; index < head->count; index++) {
        const struct span name_span = head->names[index], value_span = head->values[index];
        PyObject *name = PyBytes_FromStringAndSize((const char *)text + name_span.start, name_span.length);
        PyObject *value = name == NULL ? NULL
            : PyBytes_FromStringAndSize((const char *)text + value_span.start, value_span.length);
        PyObject *pair = value == NULL ? NULL : PyTuple_New(2);
        if (pair == NULL) {
            Py_XDECREF(name);
            Py_XDECREF(value);
            Py_DECREF(headers);
            return NULL;
        }
        PyTuple_SET_ITEM(pair, 0, name);
        PyTuple_SET_ITEM(pair, 1, value);
        PyList_SET_ITEM(headers, index, pair);
    }
    return headers;
}

static const struct name RESPONSE_REFUSED[] = {
    NAME("transfer-encoding"), NAME("connection"), NAME("proxy-connection"), {NULL, 0}};
static const struct name REQUEST_REFUSED[] = {
    NAME("transfer-encoding"), NAME("connection"), NAME("proxy-connection"), NAME("expect"), NAME("upgrade"), {NULL, 0}};
static const struct name METHODS[] = {
    NAME("GET"), NAME("POST"), NAME("PUT"), NAME("PATCH"), NAME("DELETE"), NAME("HEAD"), NAME("OPTIONS"), {NULL, 0}};

/* A tuple of `count` new references (stolen, also on failure); NULL with an exception set. */
static PyObject *tuple_of(int count, PyObject **items) {
    PyObject *tuple = NULL;
    for (int index = 0; index < count; index++) {
        if (items[index] == NULL) {
            goto failed;
        }
    }
    tuple = PyTuple_New(count);
    if (tuple == NULL) {
        goto failed;
    }
    for (int index = 0; index < count; index++) {
        PyTuple_SET_ITEM(tuple, index, items[index]);
    }
    return tuple;
failed:
    for (int index = 0; index < count; index++) {
        Py_XDECREF(items[index]);
    }
    return NULL;
}

static PyObject *parse_response(PyObject *module, PyObject *data) {
    if (!PyBytes_Check(data)) {
        PyErr_SetString(PyExc_TypeError, "parse_response(data: bytes)");
        return NULL;
    }
    const unsigned char *text = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t size = PyBytes_GET_SIZE(data);
    /* "HTTP/1.1 " + three digits + " " */
    if (size < 13 || memcmp(text, "HTTP/1.1 ", 9) != 0 || text[12] != ' ') {
        Py_RETURN_NONE;
    }
    int status = 0;
    for (int at = 9; at < 12; at++) {
        if (text[at] < '0' || text[at] > '9') {
            Py_RETURN_NONE;
        }
        status = status * 10 + (text[at] - '0');
    }
    if (status < 200 || status > 599 || status == 204 || status == 304) {
        Py_RETURN_NONE;
    }
    Py_ssize_t at = 13;
    while (classes[text[at]] & TEXT) {
        at++;
    }
    if (text[at] != '\r' || text[at + 1] != '\n') {
        Py_RETURN_NONE;
    }
    at += 2;
    struct head head;
    if (!header_lines(text, &at, RESPONSE_REFUSED, &head) || head.content_length < 0
            || size - at != head.content_length) {
        Py_RETURN_NONE;
    }
    PyObject *items[] = {PyLong_FromLong(status), header_list(text, &head),
                         PyBytes_FromStringAndSize((const char *)text + at, size - at)};
    return tuple_of(3, items);
}

static PyObject *parse_request(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyBytes_Check(args[0]) || !PyLong_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "parse_request(data: bytes, max_head: int)");
        return NULL;
    }
    Py_ssize_t max_head = PyLong_AsSsize_t(args[1]);
    if (max_head == -1 && PyErr_Occurred()) {
        return NULL;
    }
    const unsigned char *text = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t size = PyBytes_GET_SIZE(args[0]);
    const struct name *method = METHODS;
    while (method->text != NULL
           && !(size > method->length && memcmp(text, method->text, method->length) == 0 && text[method->length] == ' ')) {
        method++;
    }
    if (method->text == NULL) {
        Py_RETURN_NONE;
    }
    Py_ssize_t target_start = method->length + 1, at = target_start;
    if (at >= size || text[at] != '/') {
        Py_RETURN_NONE;
    }
    while (classes[text[at]] & TARGET) {
        at++;
    }
    Py_ssize_t target_length = at - target_start;
    if (size - at < 11 || memcmp(text + at, " HTTP/1.1\r\n", 11) != 0) {
        Py_RETURN_NONE;
    }
    at += 11;
    struct head head;
    if (!header_lines(text, &at, REQUEST_REFUSED, &head) || at > max_head
            || size - at != (head.content_length < 0 ? 0 : head.content_length)) {
        Py_RETURN_NONE;
    }
    PyObject *items[] = {PyBytes_FromStringAndSize(method->text, method->length),
                         PyBytes_FromStringAndSize((const char *)text + target_start, target_length),
                         header_list(text, &head), PyBytes_FromStringAndSize((const char *)text + at, size - at)};
    return tuple_of(4, items);
}

static PyMethodDef headers_methods[] = {
    {"strip", (PyCFunction)(void (*)(void))strip, METH_FASTCALL,
     "strip(headers, dropped) -> (lines, held): see balancer/_headers.c."},
    {"parse_response", (PyCFunction)parse_response, METH_O,
     "parse_response(data) -> (status, headers, body) or None: see balancer/_headers.c."},
    {"parse_request", (PyCFunction)(void (*)(void))parse_request, METH_FASTCALL,
     "parse_request(data, max_head) -> (method, target, headers, body) or None: see balancer/_headers.c."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef headers_module = {
    PyModuleDef_HEAD_INIT, "balancer._headers",
    "Headers in C: the lines that cross the hop, and plain requests and responses (see balancer/_headers.c).", -1,
    headers_methods,
};

PyMODINIT_FUNC PyInit__headers(void) {
    fill_classes();
    return PyModule_Create(&headers_module);
}
