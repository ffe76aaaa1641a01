/* The outcome log's request rows, encoded as they are recorded: the event loop keeps a few dozen bytes per request
   instead of its row's objects until the next flush, and the store writer reads them back as the flat list of
   columns it binds (balancer/rows.py holds the same format in Python, and the choice between the two).

   Holding each row's objects (the id, two floats, the unit id) and the list of its columns for a flush
   interval cost the balancer more than their instructions show: against those rows kept on a flat list and
   encoded at the flush, `python -m bench.compare --base fb10826` (both balancers on one core) gave 4.4 % less
   CPU per request. `marshal`, which encoded the kept lists before that, also looked up and inserted every object
   with more than one reference (each request id, which the feedback map also holds; the shared experiment,
   variant and upstream strings; cached small ints) into a hash table it built per call.

   Frame: "R", FORMAT, the row width (1 byte), the row count (4 bytes, native order: both ends run on one
   machine), then each value:
     NONE; ZERO (the int 0: "no value" in the columns given as `none_as_zero`, see store_writer); SAME (the
     value of this column in the previous row, for a str or int that is the very same object); FLOAT + 8 bytes;
     INT + 8 bytes (int64); ASCII + 1-byte length + bytes; TEXT + 4-byte length + UTF-8 bytes.
   `Rows.append` accepts a tuple of the row's width of exact str, int (within int64), float and None, like the
   store's columns; anything else raises ValueError naming the column and writes nothing. `decode` checks
   every length and tag, and that ASCII is ASCII, before it builds an object. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "rows_frame.h"

#define MAGIC ROWS_MAGIC
#define FORMAT ROWS_FORMAT
#define HEADER_SIZE ROWS_HEADER_SIZE
#define MAX_WIDTH ROWS_MAX_WIDTH
/* A buffer that grew past this for a backlog is freed when taken, not kept for the next rows. */
#define KEPT_CAPACITY (4 << 20)

typedef struct {
    PyObject_HEAD
    Py_ssize_t width;
    char none_as_zero[MAX_WIDTH];
    char *data;  /* HEADER_SIZE bytes kept free for the frame's header, then the rows */
    Py_ssize_t used;
    Py_ssize_t capacity;
    uint32_t rows;
    PyObject *previous;  /* the last row appended (a tuple), or NULL */
} Rows;

static int rows_init(Rows *self, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"width", "none_as_zero", NULL};
    Py_ssize_t width;
    PyObject *positions = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "n|O!:Rows", keywords, &width, &PyTuple_Type, &positions)) {
        return -1;
    }
    if (width < 1 || width > MAX_WIDTH) {
        PyErr_Format(PyExc_ValueError, "width must be between 1 and %d, got %zd", MAX_WIDTH, width);
        return -1;
    }
    memset(self->none_as_zero, 0, sizeof(self->none_as_zero));
    for (Py_ssize_t index = 0; positions != NULL && index < PyTuple_GET_SIZE(positions); index++) {
        Py_ssize_t position = PyLong_AsSsize_t(PyTuple_GET_ITEM(positions, index));
        if (position == -1 && PyErr_Occurred()) {
            return -1;
        }
        if (position < 0 || position >= width) {
            PyErr_Format(PyExc_ValueError, "none_as_zero position %zd is not a column of %zd", position, width);
            return -1;
        }
        self->none_as_zero[position] = 1;
    }
    self->width = width;
    self->used = HEADER_SIZE;
    self->rows = 0;
    Py_CLEAR(self->previous);
    return 0;
}

static void rows_dealloc(Rows *self) {
    Py_CLEAR(self->previous);
    PyMem_Free(self->data);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *refuse(Py_ssize_t column, const char *what) {
    PyErr_Format(PyExc_ValueError, "column %zd: %s", column, what);
    return NULL;
}

/* How one value is written: its tag, and what follows the tag. */
typedef struct {
    char tag;
    char number[8];  /* FLOAT and INT: the double or int64, as written */
    const char *text;  /* ASCII and TEXT */
    Py_ssize_t length;
} Value;

/* Decide how `value` is written (`above`: this column's value in the previous row, or NULL); the bytes it takes,
   tag included, or 0 after setting an error. */
static Py_ssize_t classify(PyObject *value, PyObject *above, const Rows *self, Py_ssize_t column, Value *out) {
    if (value == Py_None) {
        out->tag = self->none_as_zero[column] ? TAG_ZERO : TAG_NONE;
        return 1;
    }
    if (value == above && (PyUnicode_CheckExact(value) || PyLong_CheckExact(value))) {
        out->tag = TAG_SAME;
        return 1;
    }
    if (PyFloat_CheckExact(value)) {
        double number = PyFloat_AS_DOUBLE(value);
        out->tag = TAG_FLOAT;
        memcpy(out->number, &number, 8);
        return 9;
    }
    if (PyLong_CheckExact(value)) {
        int overflow = 0;
        int64_t number = (int64_t)PyLong_AsLongLongAndOverflow(value, &overflow);
        if (overflow) {
            refuse(column, "the integer does not fit 64 bits");
            return 0;
        }
        out->tag = TAG_INT;
        memcpy(out->number, &number, 8);
        return 9;
    }
    if (PyUnicode_CheckExact(value)) {
        if (PyUnicode_IS_ASCII(value) && PyUnicode_GET_LENGTH(value) <= 255) {
            out->tag = TAG_ASCII;
            out->length = PyUnicode_GET_LENGTH(value);
            out->text = (const char *)PyUnicode_1BYTE_DATA(value);
            return 2 + out->length;
        }
        out->tag = TAG_TEXT;
        out->text = PyUnicode_AsUTF8AndSize(value, &out->length);
        if (out->text == NULL) {  /* a lone surrogate: no UTF-8 for it, and SQLite could not store it either */
            PyErr_Clear();
            refuse(column, "the text is not valid Unicode");
            return 0;
        }
        if (out->length > UINT32_MAX) {
            refuse(column, "the text is too long");
            return 0;
        }
        return 5 + out->length;
    }
    PyErr_Format(PyExc_ValueError, "column %zd: a %.100s cannot be stored (str, int, float or None)", column,
                 Py_TYPE(value)->tp_name);
    return 0;
}

static PyObject *rows_append(Rows *self, PyObject *row) {
    if (!PyTuple_CheckExact(row) || PyTuple_GET_SIZE(row) != self->width) {
        PyErr_Format(PyExc_ValueError, "a row is a tuple of %zd columns, got %.100s of %zd", self->width,
                     Py_TYPE(row)->tp_name, PyTuple_Check(row) ? PyTuple_GET_SIZE(row) : (Py_ssize_t)-1);
        return NULL;
    }
    if (self->rows == UINT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "too many rows for one frame: take them first");
        return NULL;
    }
    /* Every value is classified before a byte is written, so a refused row leaves the buffer as it was. */
    Value values[MAX_WIDTH];
    Py_ssize_t size = 0;
    for (Py_ssize_t column = 0; column < self->width; column++) {
        PyObject *above = self->previous == NULL ? NULL : PyTuple_GET_ITEM(self->previous, column);
        Py_ssize_t bytes = classify(PyTuple_GET_ITEM(row, column), above, self, column, &values[column]);
        if (bytes == 0) {
            return NULL;
        }
        size += bytes;
    }
    if (self->used + size > self->capacity) {
        Py_ssize_t capacity = self->capacity * 2;
        if (capacity < self->used + size) {
            capacity = self->used + size + 4096;
        }
        char *data = PyMem_Realloc(self->data, capacity);
        if (data == NULL) {
            return PyErr_NoMemory();
        }
        self->data = data;
        self->capacity = capacity;
    }
    char *out = self->data + self->used;
    for (Py_ssize_t column = 0; column < self->width; column++) {
        const Value *value = &values[column];
        *out++ = value->tag;
        switch (value->tag) {
        case TAG_FLOAT:
        case TAG_INT:
            memcpy(out, value->number, 8);
            out += 8;
            break;
        case TAG_ASCII:
            *out++ = (char)(unsigned char)value->length;
            memcpy(out, value->text, value->length);
            out += value->length;
            break;
        case TAG_TEXT: {
            uint32_t length = (uint32_t)value->length;
            memcpy(out, &length, 4);
            memcpy(out + 4, value->text, value->length);
            out += 4 + value->length;
            break;
        }
        default:  /* NONE, ZERO, SAME: the tag is all */
            break;
        }
    }
    self->used += size;
    self->rows += 1;
    Py_INCREF(row);
    Py_XSETREF(self->previous, row);
    Py_RETURN_NONE;
}

static PyObject *rows_take(Rows *self, PyObject *unused) {
    if (self->rows == 0) {
        return Py_BuildValue("(y#I)", "", (Py_ssize_t)0, 0u);
    }
    self->data[0] = MAGIC;
    self->data[1] = FORMAT;
    self->data[2] = (char)self->width;
    memcpy(self->data + 3, &self->rows, 4);
    PyObject *taken = Py_BuildValue("(y#I)", self->data, self->used, self->rows);
    if (taken == NULL) {
        return NULL;
    }
    self->used = HEADER_SIZE;
    self->rows = 0;
    Py_CLEAR(self->previous);
    if (self->capacity > KEPT_CAPACITY) {
        PyMem_Free(self->data);
        self->data = NULL;
        self->capacity = 0;
    }
    return taken;
}

static Py_ssize_t rows_length(Rows *self) {
    return self->rows;
}

static PyMethodDef rows_type_methods[] = {
    {"append", (PyCFunction)rows_append, METH_O,
     "append(row): encode one row (a tuple of the width's values); ValueError, and nothing written, for a value "
     "the store cannot take."},
    {"take", (PyCFunction)rows_take, METH_NOARGS,
     "take() -> (frame, rows): the rows appended since the last take, as one frame for `decode`; then empty."},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods rows_sequence = {.sq_length = (lenfunc)rows_length};

static PyTypeObject RowsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "balancer._rows.Rows",
    .tp_doc = "Rows(width, none_as_zero=()): request rows encoded as they are appended; len() is how many.",
    .tp_basicsize = sizeof(Rows),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)rows_init,
    .tp_dealloc = (destructor)rows_dealloc,
    .tp_methods = rows_type_methods,
    .tp_as_sequence = &rows_sequence,
};

static PyObject *rows_decode(PyObject *module, PyObject *argument) {
    Py_buffer view;
    if (PyObject_GetBuffer(argument, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    FrameReader reader;
    PyObject *list = NULL;
    if (frame_open(&reader, view.buf, view.len, 0) < 0) {
        goto corrupt;
    }
    list = PyList_New(reader.count);
    if (list == NULL) {
        goto fail;
    }
    for (Py_ssize_t index = 0; index < reader.count; index++) {
        FrameValue read;
        PyObject *value;
        if (frame_next(&reader, &read) < 0) {
            goto corrupt;
        }
        if (read.repeated) {
            value = Py_NewRef(PyList_GET_ITEM(list, index - reader.width));
        } else {
            switch (read.tag) {
            case TAG_NONE:
                value = Py_NewRef(Py_None);
                break;
            case TAG_ZERO:
                value = PyLong_FromLong(0);
                break;
            case TAG_FLOAT:
                value = PyFloat_FromDouble(read.real);
                break;
            case TAG_INT:
                value = PyLong_FromLongLong((long long)read.integer);
                break;
            case TAG_ASCII:
                value = PyUnicode_New(read.length, 127);
                if (value != NULL) {
                    memcpy(PyUnicode_1BYTE_DATA(value), read.text, read.length);
                }
                break;
            default:  /* TAG_TEXT */
                value = PyUnicode_DecodeUTF8(read.text, read.length, "strict");
                break;
            }
        }
        if (value == NULL) {
            goto fail;
        }
        PyList_SET_ITEM(list, index, value);
    }
    if (frame_close(&reader) < 0) {
        goto corrupt;
    }
    PyBuffer_Release(&view);
    return list;
corrupt:
    frame_error(&reader);
fail:
    Py_XDECREF(list);
    PyBuffer_Release(&view);
    return NULL;
}

static PyMethodDef rows_methods[] = {
    {"decode", rows_decode, METH_O, "decode(frame) -> list: the rows' columns, row after row."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef rows_module = {
    PyModuleDef_HEAD_INIT, "balancer._rows",
    "The outcome log's request rows, encoded as they are recorded (see balancer/_rows.c).", -1, rows_methods,
};

PyMODINIT_FUNC PyInit__rows(void) {
    if (PyType_Ready(&RowsType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&rows_module);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(module, "Rows", (PyObject *)&RowsType) < 0
            || PyModule_AddIntConstant(module, "FORMAT", FORMAT) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
