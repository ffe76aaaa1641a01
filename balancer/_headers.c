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

/* Whether `dropped` is a tuple of at most MAX_DROPPED bytes names; 0 with an exception set if not. */
static int check_dropped(PyObject *dropped, const char *usage) {
    if (!PyTuple_Check(dropped)) {
        PyErr_SetString(PyExc_TypeError, usage);
        return 0;
    }
    Py_ssize_t dropped_count = PyTuple_GET_SIZE(dropped);
    if (dropped_count > MAX_DROPPED) {
        PyErr_Format(PyExc_ValueError, "at most %d dropped names, got %zd", MAX_DROPPED, dropped_count);
        return 0;
    }
    for (Py_ssize_t index = 0; index < dropped_count; index++) {
        if (!PyBytes_Check(PyTuple_GET_ITEM(dropped, index))) {
            PyErr_Format(PyExc_TypeError, "dropped[%zd] is not bytes", index);
            return 0;
        }
    }
    return 1;
}

/* One header in place: its name and value, where they are. */
struct field {
    const char *name, *value;
    Py_ssize_t name_length, value_length;
    PyObject *value_object;  /* the value as bytes, where the caller has it already (borrowed); else NULL */
};

/* strip()'s lines and held for `count` fields, as new references in *lines_out and *held_out: 1, or 0 with an
   exception set (and neither set). */
static int stripped(const struct field *fields, Py_ssize_t count, PyObject *dropped, PyObject **lines_out,
                    PyObject **held_out) {
    char stack_keep[32];
    char *keep = count <= (Py_ssize_t)sizeof(stack_keep) ? stack_keep : PyMem_Malloc(count);
    if (keep == NULL) {
        PyErr_NoMemory();
        return 0;
    }
    PyObject *held = PyList_New(0), *lines = NULL;
    int done_well = 0;
    if (held == NULL) {
        goto done;
    }
    /* First pass: decide which cross, and size the lines. */
    Py_ssize_t size = 0;
    for (Py_ssize_t index = 0; index < count; index++) {
        const struct field *field = &fields[index];
        Py_ssize_t position = find((const unsigned char *)field->name, field->name_length, dropped);
        keep[index] = position < 0;
        if (position < 0) {
            size += field->name_length + field->value_length + 4;  /* ": " and CRLF */
            continue;
        }
        PyObject *value = field->value_object != NULL ? Py_NewRef(field->value_object)
            : PyBytes_FromStringAndSize(field->value, field->value_length);
        PyObject *entry = value == NULL ? NULL : PyTuple_New(2);
        if (entry == NULL) {
            Py_XDECREF(value);
            goto done;
        }
        PyTuple_SET_ITEM(entry, 0, PyLong_FromSsize_t(position));  /* a small int: cached, never fails */
        PyTuple_SET_ITEM(entry, 1, value);
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
        const struct field *field = &fields[index];
        memcpy(out, field->name, field->name_length);
        out += field->name_length;
        *out++ = ':';
        *out++ = ' ';
        memcpy(out, field->value, field->value_length);
        out += field->value_length;
        *out++ = '\r';
        *out++ = '\n';
    }
    *lines_out = lines;
    *held_out = held;
    done_well = 1;
done:
    if (keep != stack_keep) {
        PyMem_Free(keep);
    }
    if (!done_well) {
        Py_XDECREF(lines);
        Py_XDECREF(held);
    }
    return done_well;
}

#define STRIP_USAGE "strip(headers: list, dropped: tuple)"

static PyObject *strip(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyList_Check(args[0]) || !PyTuple_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, STRIP_USAGE);
        return NULL;
    }
    PyObject *headers = args[0], *dropped = args[1];
    if (!check_dropped(dropped, STRIP_USAGE)) {
        return NULL;
    }
    Py_ssize_t count = PyList_GET_SIZE(headers);
    struct field stack_fields[32];
    struct field *fields = count <= 32 ? stack_fields : PyMem_Malloc(count * sizeof(struct field));
    if (fields == NULL) {
        return PyErr_NoMemory();
    }
    PyObject *result = NULL;
    for (Py_ssize_t index = 0; index < count; index++) {
        PyObject *pair = PyList_GET_ITEM(headers, index);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2 || !PyBytes_Check(PyTuple_GET_ITEM(pair, 0))
                || !PyBytes_Check(PyTuple_GET_ITEM(pair, 1))) {
            PyErr_Format(PyExc_TypeError, "headers[%zd] is not a (name, value) pair of bytes", index);
            goto done;
        }
        PyObject *name = PyTuple_GET_ITEM(pair, 0), *value = PyTuple_GET_ITEM(pair, 1);
        fields[index] = (struct field){PyBytes_AS_STRING(name), PyBytes_AS_STRING(value), PyBytes_GET_SIZE(name),
                                       PyBytes_GET_SIZE(value), value};
    }
    /* The list is not touched from here on: the fields point into bytes objects it holds. */
    PyObject *lines, *held;
    if (stripped(fields, count, dropped, &lines, &held)) {
        PyObject *items[] = {lines, held};
        result = tuple_of(2, items);
    }
done:
    if (fields != stack_fields) {
        PyMem_Free(fields);
    }
    return result;
}

/* Whole messages in one call, where httptools would call back into Python for the URL, every header, the body
   and the message's end (each callback a method lookup and a call):

   parse_request(data, max_head, dropped) -> (method, target, header_map, lines, held, body) or None
   parse_response(data, dropped) -> (status, lines, held, body) or None
   header_pairs(data) -> [(name, value), ...]

   Each parser answers only for one message complete in `data` with nothing after it, in the plain form clients and
   model servers send: HTTP/1.1; header lines of a token name, a colon and a non-empty value of visible ASCII,
   spaces and tabs (leading ones skipped, as llhttp does; none trailing); at most one Content-Length, of digits,
   and exactly that many bytes of body after the headers (none without it); and none of the headers that
   change how the message is framed or whether the connection stays open (Transfer-Encoding, Connection,
   Proxy-Connection; in a request also Expect and Upgrade). A request also needs one of the usual methods, a
   target in origin form ("/..." of URI characters, no fragment) and at most `max_head` bytes before its body;
   a response a status from 200 to 599 other than 204 and 304, and a Content-Length. The connection stays open.

   They give the headers in the form the hop uses them, built from the message's bytes in the same pass:
   (lines, held) as strip(headers, dropped) gives them for the (name, value) pairs httptools would report, and
   for a request header_map, each lower-case name to the value of its first header. The method is a str (one
   object per method, shared) and so is the target (latin-1, as ASCII). header_pairs(data) gives those pairs
   themselves for a message either parser took; only a caller that needs them pays for them.

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

/* `head`'s headers as fields of `text`, each with its value from `values` (borrowed) where given. */
static void head_fields(const unsigned char *text, const struct head *head, PyObject *const *values,
                        struct field *fields) {
    for (int index = 0; index < head->count; index++) {
        const struct span name = head->names[index], value = head->values[index];
        fields[index] = (struct field){(const char *)text + name.start, (const char *)text + value.start, name.length,
                                       value.length, values == NULL ? NULL : values[index]};
    }
}

/* {lower-case name: value of its first header} of `head`'s headers, the values from `values` (borrowed); NULL with
   an exception set. */
static PyObject *header_dict(const unsigned char *text, const struct head *head, PyObject *const *values) {
    PyObject *map = PyDict_New();
    if (map == NULL) {
        return NULL;
    }
    for (int index = 0; index < head->count; index++) {
        const struct span name = head->names[index];
        PyObject *key = PyBytes_FromStringAndSize(NULL, name.length);
        if (key == NULL) {
            Py_DECREF(map);
            return NULL;
        }
        char *out = PyBytes_AS_STRING(key);
        for (Py_ssize_t at = 0; at < name.length; at++) {
            out[at] = (char)lower(text[name.start + at]);
        }
        PyObject *kept = PyDict_SetDefault(map, key, values[index]);  /* the first of a name stays */
        Py_DECREF(key);
        if (kept == NULL) {
            Py_DECREF(map);
            return NULL;
        }
    }
    return map;
}

static const struct name RESPONSE_REFUSED[] = {
    NAME("transfer-encoding"), NAME("connection"), NAME("proxy-connection"), {NULL, 0}};
static const struct name REQUEST_REFUSED[] = {
    NAME("transfer-encoding"), NAME("connection"), NAME("proxy-connection"), NAME("expect"), NAME("upgrade"), {NULL, 0}};
static const struct name METHODS[] = {
    NAME("GET"), NAME("POST"), NAME("PUT"), NAME("PATCH"), NAME("DELETE"), NAME("HEAD"), NAME("OPTIONS"), {NULL, 0}};

/* The status line of a plain response in `text` (`size` bytes): 1 with the status and *at after it, or 0. */
static int status_line(const unsigned char *text, Py_ssize_t size, int *status_out, Py_ssize_t *at_out) {
    /* "HTTP/1.1 " + three digits + " " */
    if (size < 13 || memcmp(text, "HTTP/1.1 ", 9) != 0 || text[12] != ' ') {
        return 0;
    }
    int status = 0;
    for (int at = 9; at < 12; at++) {
        if (text[at] < '0' || text[at] > '9') {
            return 0;
        }
        status = status * 10 + (text[at] - '0');
    }
    if (status < 200 || status > 599 || status == 204 || status == 304) {
        return 0;
    }
    Py_ssize_t at = 13;
    while (classes[text[at]] & TEXT) {
        at++;
    }
    if (text[at] != '\r' || text[at + 1] != '\n') {
        return 0;
    }
    *status_out = status;
    *at_out = at + 2;
    return 1;
}

/* The request line of a plain request in `text` (`size` bytes): 1 with its method (an entry of METHODS), its
   target's span and *at after it, or 0. */
static int request_line(const unsigned char *text, Py_ssize_t size, int *method_out, struct span *target,
                        Py_ssize_t *at_out) {
    int method = 0;
    while (METHODS[method].text != NULL
           && !(size > METHODS[method].length && memcmp(text, METHODS[method].text, METHODS[method].length) == 0
                && text[METHODS[method].length] == ' ')) {
        method++;
    }
    if (METHODS[method].text == NULL) {
        return 0;
    }
    Py_ssize_t target_start = METHODS[method].length + 1, at = target_start;
    if (at >= size || text[at] != '/') {
        return 0;
    }
    while (classes[text[at]] & TARGET) {
        at++;
    }
    if (size - at < 11 || memcmp(text + at, " HTTP/1.1\r\n", 11) != 0) {
        return 0;
    }
    *method_out = method;
    *target = (struct span){target_start, at - target_start};
    *at_out = at + 11;
    return 1;
}

#define RESPONSE_USAGE "parse_response(data: bytes, dropped: tuple)"
#define REQUEST_USAGE "parse_request(data: bytes, max_head: int, dropped: tuple)"

static PyObject *parse_response(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyBytes_Check(args[0]) || !check_dropped(args[1], RESPONSE_USAGE)) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, RESPONSE_USAGE);
        }
        return NULL;
    }
    const unsigned char *text = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t size = PyBytes_GET_SIZE(args[0]), at;
    int status;
    struct head head;
    if (!status_line(text, size, &status, &at) || !header_lines(text, &at, RESPONSE_REFUSED, &head)
            || head.content_length < 0 || size - at != head.content_length) {
        Py_RETURN_NONE;
    }
    struct field fields[MAX_FAST_HEADERS];
    head_fields(text, &head, NULL, fields);
    PyObject *lines, *held;
    if (!stripped(fields, head.count, args[1], &lines, &held)) {
        return NULL;
    }
    PyObject *items[] = {PyLong_FromLong(status), lines, held, PyBytes_FromStringAndSize((const char *)text + at, size - at)};
    return tuple_of(4, items);
}

static PyObject *method_names[sizeof(METHODS) / sizeof(METHODS[0])];  /* str of each, made when the module loads */

static PyObject *parse_request(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyBytes_Check(args[0]) || !PyLong_Check(args[1]) || !check_dropped(args[2], REQUEST_USAGE)) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, REQUEST_USAGE);
        }
        return NULL;
    }
    Py_ssize_t max_head = PyLong_AsSsize_t(args[1]);
    if (max_head == -1 && PyErr_Occurred()) {
        return NULL;
    }
    const unsigned char *text = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t size = PyBytes_GET_SIZE(args[0]), at;
    int method;
    struct span target;
    struct head head;
    if (!request_line(text, size, &method, &target, &at) || !header_lines(text, &at, REQUEST_REFUSED, &head)
            || at > max_head || size - at != (head.content_length < 0 ? 0 : head.content_length)) {
        Py_RETURN_NONE;
    }
    /* Each value once, for the header map and the held headers alike. */
    PyObject *values[MAX_FAST_HEADERS];
    for (int index = 0; index < head.count; index++) {
        values[index] = PyBytes_FromStringAndSize((const char *)text + head.values[index].start, head.values[index].length);
        if (values[index] == NULL) {
            for (int made = 0; made < index; made++) {
                Py_DECREF(values[made]);
            }
            return NULL;
        }
    }
    struct field fields[MAX_FAST_HEADERS] = {{0}};  /* all set by head_fields: initialised for the compiler's sake */
    head_fields(text, &head, values, fields);
    PyObject *map = header_dict(text, &head, values), *lines, *held;
    int split = map != NULL && stripped(fields, head.count, args[2], &lines, &held);
    for (int index = 0; index < head.count; index++) {
        Py_DECREF(values[index]);
    }
    if (!split) {
        Py_XDECREF(map);
        return NULL;
    }
    PyObject *items[] = {Py_NewRef(method_names[method]),
                         PyUnicode_DecodeLatin1((const char *)text + target.start, target.length, NULL), map, lines,
                         held, PyBytes_FromStringAndSize((const char *)text + at, size - at)};
    return tuple_of(6, items);
}

static PyObject *header_pairs(PyObject *module, PyObject *data) {
    if (!PyBytes_Check(data)) {
        PyErr_SetString(PyExc_TypeError, "header_pairs(data: bytes)");
        return NULL;
    }
    const unsigned char *text = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t size = PyBytes_GET_SIZE(data), at;
    int status, method;
    struct span target;
    struct head head;
    if (!((status_line(text, size, &status, &at) && header_lines(text, &at, RESPONSE_REFUSED, &head))
          || (request_line(text, size, &method, &target, &at) && header_lines(text, &at, REQUEST_REFUSED, &head)))) {
        PyErr_SetString(PyExc_ValueError, "header_pairs: not a message parse_request or parse_response took");
        return NULL;
    }
    return header_list(text, &head);
}

static PyMethodDef headers_methods[] = {
    {"strip", (PyCFunction)(void (*)(void))strip, METH_FASTCALL,
     "strip(headers, dropped) -> (lines, held): see balancer/_headers.c."},
    {"parse_response", (PyCFunction)(void (*)(void))parse_response, METH_FASTCALL,
     "parse_response(data, dropped) -> (status, lines, held, body) or None: see balancer/_headers.c."},
    {"parse_request", (PyCFunction)(void (*)(void))parse_request, METH_FASTCALL,
     "parse_request(data, max_head, dropped) -> (method, target, header_map, lines, held, body) or None: see "
     "balancer/_headers.c."},
    {"header_pairs", (PyCFunction)header_pairs, METH_O,
     "header_pairs(data) -> [(name, value), ...] of a message the parsers took: see balancer/_headers.c."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef headers_module = {
    PyModuleDef_HEAD_INIT, "balancer._headers",
    "Headers in C: the lines that cross the hop, and plain requests and responses (see balancer/_headers.c).", -1,
    headers_methods,
};

PyMODINIT_FUNC PyInit__headers(void) {
    fill_classes();
    for (int method = 0; METHODS[method].text != NULL; method++) {
        if (method_names[method] == NULL) {
            method_names[method] = PyUnicode_InternFromString(METHODS[method].text);
            if (method_names[method] == NULL) {
                return NULL;
            }
        }
    }
    return PyModule_Create(&headers_module);
}
