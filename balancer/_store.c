/* The store writer's own SQLite connection, which inserts request rows straight from their frames.

   Through Python's sqlite3, a request row cost the writer 12,279 instructions: 5,728 for SQLite to execute
   the INSERT, 3,973 for the module to bind the row's 11 parameters (a type check, an adapter lookup and a
   copy of every text), 1,050 to decode the frame into Python objects first. Here a row is read from its frame
   (rows_frame.h) and bound as it is: numbers by value, texts in place (SQLITE_STATIC: the frame outlives the
   statement's step), "no value" as NULL (no NULLIF in the statement); no Python object is made. The writer's
   whole cost is 7,495 instructions a row, 4,888 of them SQLite's (`python -m bench.instructions --functions
   default`, before and after).

   Connection(path, inserts, busy_timeout_ms=5000) opens an existing store (balancer.store creates the schema)
   and prepares `inserts`: INSERT statements of several rows each, largest first, the last of one row, with one
   parameter per column of the frames it will be given (balancer.store_writer.insert_statements). A frame's
   rows go in as few of them as it takes, as on the Python path: a one-row statement stepped for every row,
   tried first, cost SQLite more per row than the multi-row one costs here, since it starts and ends its program,
   and seeks the table's B-tree from its root, for every row. Its methods are what the writer's transaction needs:
     execute(sql)              statements without parameters (BEGIN IMMEDIATE, COMMIT, ROLLBACK, PRAGMA ...)
     executemany(sql, rows)    rows of None, int, float, str or bytes (feedback, configs)
     insert_requests(frame)    every row of a rows frame; the rows SQLite stored (a conflict it was told to
                               ignore stores none)
     close()
   SQLite's errors are raised as Python's sqlite3 exceptions, chosen the way the sqlite3 module chooses them
   (OperationalError for a busy or full database, IntegrityError for a constraint, ...), so the writer
   handles both connections' errors alike. A corrupt frame raises ValueError. The connection belongs to one
   thread, like everything in the writer process. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <sqlite3.h>

#include "rows_frame.h"

typedef struct {
    PyObject *InterfaceError, *DatabaseError, *InternalError, *OperationalError, *ProgrammingError,
        *IntegrityError, *DataError;
} Exceptions;

static Exceptions exceptions;

#define MAX_INSERTS 32

typedef struct {
    PyObject_HEAD
    sqlite3 *db;
    sqlite3_stmt *inserts[MAX_INSERTS];  /* largest first; the last inserts one row */
    int rows[MAX_INSERTS];  /* rows each one inserts */
    int count;
    int width;  /* parameters per row */
} Connection;

/* The sqlite3 module's exception for a result code (as in CPython's Modules/_sqlite/util.c). */
static PyObject *exception_for(int code) {
    switch (code & 0xff) {
    case SQLITE_INTERNAL:
    case SQLITE_NOTFOUND:
        return exceptions.InternalError;
    case SQLITE_NOMEM:
        return PyExc_MemoryError;
    case SQLITE_ERROR:
    case SQLITE_PERM:
    case SQLITE_ABORT:
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
    case SQLITE_READONLY:
    case SQLITE_INTERRUPT:
    case SQLITE_IOERR:
    case SQLITE_FULL:
    case SQLITE_CANTOPEN:
    case SQLITE_PROTOCOL:
    case SQLITE_EMPTY:
    case SQLITE_SCHEMA:
        return exceptions.OperationalError;
    case SQLITE_CORRUPT:
        return exceptions.DatabaseError;
    case SQLITE_TOOBIG:
        return exceptions.DataError;
    case SQLITE_CONSTRAINT:
    case SQLITE_MISMATCH:
        return exceptions.IntegrityError;
    case SQLITE_MISUSE:
    case SQLITE_RANGE:
        return exceptions.InterfaceError;
    default:
        return exceptions.DatabaseError;
    }
}

/* Raise SQLite's error for `code` (with the connection's message, when there is a connection); NULL. */
static PyObject *raise_sqlite(sqlite3 *db, int code) {
    PyObject *type = exception_for(code);
    const char *message = db != NULL ? sqlite3_errmsg(db) : sqlite3_errstr(code);
    if (type == PyExc_MemoryError) {
        return PyErr_NoMemory();
    }
    PyObject *error = PyObject_CallFunction(type, "s", message);
    if (error == NULL) {
        return NULL;
    }
    PyObject *number = PyLong_FromLong(db != NULL ? sqlite3_extended_errcode(db) : code);
    if (number == NULL || PyObject_SetAttrString(error, "sqlite_errorcode", number) < 0) {
        Py_XDECREF(number);
        Py_DECREF(error);
        return NULL;
    }
    Py_DECREF(number);
    PyErr_SetObject(type, error);
    Py_DECREF(error);
    return NULL;
}

static int connection_is_open(Connection *self) {
    if (self->db == NULL) {
        PyErr_SetString(exceptions.ProgrammingError, "the connection is closed");
        return 0;
    }
    return 1;
}

static void connection_release(Connection *self) {
    for (int index = 0; index < self->count; index++) {
        sqlite3_finalize(self->inserts[index]);
        self->inserts[index] = NULL;
    }
    self->count = 0;
    sqlite3_close_v2(self->db);
    self->db = NULL;
}

/* Prepare the inserts (a sequence of SQL texts, largest first, the last for one row): 0, or -1 with an error. */
static int prepare_inserts(Connection *self, PyObject *texts) {
    PyObject *sequence = PySequence_Fast(texts, "inserts is a sequence of INSERT statements");
    if (sequence == NULL) {
        return -1;
    }
    Py_ssize_t count = PySequence_Fast_GET_SIZE(sequence);
    if (count < 1 || count > MAX_INSERTS) {
        PyErr_Format(PyExc_ValueError, "between 1 and %d inserts, got %zd", MAX_INSERTS, count);
        goto fail;
    }
    for (Py_ssize_t index = 0; index < count; index++) {
        const char *sql = PyUnicode_AsUTF8(PySequence_Fast_GET_ITEM(sequence, index));
        if (sql == NULL) {
            goto fail;
        }
        int code = sqlite3_prepare_v3(self->db, sql, -1, SQLITE_PREPARE_PERSISTENT, &self->inserts[index], NULL);
        if (code != SQLITE_OK) {
            raise_sqlite(self->db, code);
            goto fail;
        }
        self->count = (int)index + 1;
        if (self->inserts[index] == NULL) {
            PyErr_Format(PyExc_ValueError, "insert %zd holds no statement", index);
            goto fail;
        }
    }
    self->width = sqlite3_bind_parameter_count(self->inserts[count - 1]);
    for (Py_ssize_t index = 0; index < count; index++) {
        int parameters = sqlite3_bind_parameter_count(self->inserts[index]);
        self->rows[index] = self->width > 0 ? parameters / self->width : 0;
        if (self->width == 0 || parameters % self->width != 0
                || (index > 0 && self->rows[index] >= self->rows[index - 1])) {
            PyErr_SetString(PyExc_ValueError, "each insert takes whole rows, fewer than the one before, and the last "
                            "one row of at least one parameter");
            goto fail;
        }
    }
    Py_DECREF(sequence);
    return 0;
fail:
    Py_DECREF(sequence);
    return -1;
}

static int connection_init(Connection *self, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"path", "inserts", "busy_timeout_ms", NULL};
    PyObject *path, *inserts;
    int busy_timeout_ms = 5000;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O&O|i:Connection", keywords, PyUnicode_FSConverter, &path,
                                     &inserts, &busy_timeout_ms)) {
        return -1;
    }
    connection_release(self);
    int code = sqlite3_open_v2(PyBytes_AS_STRING(path), &self->db, SQLITE_OPEN_READWRITE, NULL);
    Py_DECREF(path);
    if (code != SQLITE_OK) {
        raise_sqlite(self->db, code);
        connection_release(self);
        return -1;
    }
    sqlite3_busy_timeout(self->db, busy_timeout_ms);
    /* synchronous is a setting of the connection: NORMAL, as balancer.store sets it on its own. */
    code = sqlite3_exec(self->db, "PRAGMA synchronous = NORMAL", NULL, NULL, NULL);
    if (code != SQLITE_OK) {
        raise_sqlite(self->db, code);
        connection_release(self);
        return -1;
    }
    if (prepare_inserts(self, inserts) < 0) {
        connection_release(self);
        return -1;
    }
    return 0;
}

static void connection_dealloc(Connection *self) {
    connection_release(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *connection_close(Connection *self, PyObject *unused) {
    connection_release(self);
    Py_RETURN_NONE;
}

static PyObject *connection_execute(Connection *self, PyObject *argument) {
    if (!connection_is_open(self)) {
        return NULL;
    }
    const char *sql = PyUnicode_AsUTF8(argument);
    if (sql == NULL) {
        return NULL;
    }
    int code = sqlite3_exec(self->db, sql, NULL, NULL, NULL);
    if (code != SQLITE_OK) {
        return raise_sqlite(self->db, code);
    }
    Py_RETURN_NONE;
}

/* Bind one Python value: 0, or -1 with an error set. */
static int bind_object(Connection *self, sqlite3_stmt *statement, int position, PyObject *value) {
    int code;
    if (value == Py_None) {
        code = sqlite3_bind_null(statement, position);
    } else if (PyLong_Check(value)) {
        int overflow = 0;
        long long number = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (overflow) {
            PyErr_Format(exceptions.ProgrammingError, "parameter %d: the integer does not fit 64 bits", position);
            return -1;
        }
        if (number == -1 && PyErr_Occurred()) {
            return -1;
        }
        code = sqlite3_bind_int64(statement, position, number);
    } else if (PyFloat_Check(value)) {
        code = sqlite3_bind_double(statement, position, PyFloat_AS_DOUBLE(value));
    } else if (PyUnicode_Check(value)) {
        Py_ssize_t length;
        const char *text = PyUnicode_AsUTF8AndSize(value, &length);
        if (text == NULL) {
            PyErr_Clear();
            PyErr_Format(exceptions.ProgrammingError, "parameter %d: the text is not valid Unicode", position);
            return -1;
        }
        code = sqlite3_bind_text64(statement, position, text, (sqlite3_uint64)length, SQLITE_TRANSIENT, SQLITE_UTF8);
    } else if (PyBytes_Check(value)) {
        code = sqlite3_bind_blob64(statement, position, PyBytes_AS_STRING(value),
                                   (sqlite3_uint64)PyBytes_GET_SIZE(value), SQLITE_TRANSIENT);
    } else {
        PyErr_Format(exceptions.ProgrammingError, "parameter %d: a %.100s cannot be stored", position,
                     Py_TYPE(value)->tp_name);
        return -1;
    }
    if (code != SQLITE_OK) {
        raise_sqlite(self->db, code);
        return -1;
    }
    return 0;
}

static PyObject *connection_executemany(Connection *self, PyObject *args) {
    const char *sql;
    PyObject *rows;
    if (!PyArg_ParseTuple(args, "sO:executemany", &sql, &rows) || !connection_is_open(self)) {
        return NULL;
    }
    PyObject *iterator = PyObject_GetIter(rows);
    if (iterator == NULL) {
        return NULL;
    }
    sqlite3_stmt *statement = NULL;
    int code = sqlite3_prepare_v2(self->db, sql, -1, &statement, NULL);
    if (code != SQLITE_OK) {
        Py_DECREF(iterator);
        return raise_sqlite(self->db, code);
    }
    int parameters = statement == NULL ? 0 : sqlite3_bind_parameter_count(statement);
    PyObject *row;
    while ((row = PyIter_Next(iterator)) != NULL) {
        PyObject *values = PySequence_Fast(row, "a row is a sequence of values");
        Py_DECREF(row);
        if (values == NULL) {
            goto fail;
        }
        if (PySequence_Fast_GET_SIZE(values) != parameters) {
            PyErr_Format(exceptions.ProgrammingError, "the statement has %d parameters, the row %zd values",
                         parameters, PySequence_Fast_GET_SIZE(values));
            Py_DECREF(values);
            goto fail;
        }
        for (int position = 1; position <= parameters; position++) {
            if (bind_object(self, statement, position, PySequence_Fast_GET_ITEM(values, position - 1)) < 0) {
                Py_DECREF(values);
                goto fail;
            }
        }
        Py_DECREF(values);
        if (statement != NULL) {
            code = sqlite3_step(statement);
            if (code != SQLITE_DONE && code != SQLITE_ROW) {
                raise_sqlite(self->db, code);
                goto fail;
            }
            sqlite3_reset(statement);
        }
    }
    if (PyErr_Occurred()) {
        goto fail;
    }
    Py_DECREF(iterator);
    sqlite3_finalize(statement);
    Py_RETURN_NONE;
fail:
    Py_DECREF(iterator);
    sqlite3_finalize(statement);
    return NULL;
}

/* Bind the reader's next `rows` rows to `insert`: 0, or -1 with an error set (`corrupt`: the frame is).
   Texts are bound in place (SQLITE_STATIC). A statement keeps its bindings after the call, pointing into a frame
   that is gone, but it is stepped only after all its parameters were bound again: clearing them after each frame
   cost 400 instructions a request (sqlite3_clear_bindings releases every parameter of every statement used). */
static int bind_rows(Connection *self, sqlite3_stmt *insert, FrameReader *reader, int rows, int *corrupt) {
    int parameters = rows * self->width;
    for (int position = 1; position <= parameters; position++) {
        FrameValue value;
        int code;
        if (frame_next(reader, &value) < 0) {
            *corrupt = 1;
            return -1;
        }
        switch (value.tag) {
        case TAG_FLOAT:
            code = sqlite3_bind_double(insert, position, value.real);
            break;
        case TAG_INT:
            code = sqlite3_bind_int64(insert, position, value.integer);
            break;
        case TAG_ASCII:
        case TAG_TEXT:
            code = sqlite3_bind_text64(insert, position, value.text, (sqlite3_uint64)value.length, SQLITE_STATIC,
                                       SQLITE_UTF8);
            break;
        default:  /* TAG_NONE, and TAG_ZERO: "no value" in a column the balancer encodes None as 0 in */
            code = sqlite3_bind_null(insert, position);
            break;
        }
        if (code != SQLITE_OK) {
            raise_sqlite(self->db, code);
            return -1;
        }
    }
    return 0;
}

static PyObject *connection_insert_requests(Connection *self, PyObject *argument) {
    if (!connection_is_open(self)) {
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(argument, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    sqlite3 *db = self->db;
    FrameReader reader;
    sqlite3_stmt *insert = NULL;
    long long inserted = 0;
    int corrupt = 0;
    if (frame_open(&reader, view.buf, view.len, 1) < 0) {
        corrupt = 1;
        goto fail;
    }
    if (reader.width != self->width) {
        PyErr_Format(exceptions.ProgrammingError, "the frame's rows have %zd columns, the inserts %d parameters a row",
                     reader.width, self->width);
        goto fail;
    }
    Py_ssize_t left = reader.count / reader.width;
    for (int index = 0; index < self->count; index++) {
        insert = self->inserts[index];
        while (left >= self->rows[index]) {
            if (bind_rows(self, insert, &reader, self->rows[index], &corrupt) < 0) {
                goto fail;
            }
            int code = sqlite3_step(insert);
            if (code != SQLITE_DONE) {
                raise_sqlite(db, code);
                goto fail;
            }
            inserted += sqlite3_changes(db);
            sqlite3_reset(insert);
            left -= self->rows[index];
        }
        insert = NULL;
    }
    if (frame_close(&reader) < 0) {
        corrupt = 1;
        goto fail;
    }
    PyBuffer_Release(&view);
    return PyLong_FromLongLong(inserted);
fail:
    if (corrupt) {
        frame_error(&reader);
    }
    if (insert != NULL) {
        sqlite3_reset(insert);
    }
    PyBuffer_Release(&view);
    return NULL;
}

static PyMethodDef connection_methods[] = {
    {"execute", (PyCFunction)connection_execute, METH_O, "execute(sql): run statements that take no parameters."},
    {"executemany", (PyCFunction)connection_executemany, METH_VARARGS,
     "executemany(sql, rows): run one statement for every row of None, int, float, str or bytes values."},
    {"insert_requests", (PyCFunction)connection_insert_requests, METH_O,
     "insert_requests(frame) -> int: run the insert for every row of a rows frame; the rows stored."},
    {"close", (PyCFunction)connection_close, METH_NOARGS, "close(): close the connection (again is a no-op)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ConnectionType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "balancer._store.Connection",
    .tp_doc = "Connection(path, inserts, busy_timeout_ms=5000): see balancer/_store.c.",
    .tp_basicsize = sizeof(Connection),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)connection_init,
    .tp_dealloc = (destructor)connection_dealloc,
    .tp_methods = connection_methods,
};

static struct PyModuleDef store_module = {
    PyModuleDef_HEAD_INIT, "balancer._store",
    "The store writer's own SQLite connection, inserting request rows straight from their frames "
    "(see balancer/_store.c).", -1, NULL,
};

static int load_exceptions(void) {
    PyObject *sqlite = PyImport_ImportModule("sqlite3");
    if (sqlite == NULL) {
        return -1;
    }
    struct { const char *name; PyObject **slot; } wanted[] = {
        {"InterfaceError", &exceptions.InterfaceError},
        {"DatabaseError", &exceptions.DatabaseError}, {"InternalError", &exceptions.InternalError},
        {"OperationalError", &exceptions.OperationalError}, {"ProgrammingError", &exceptions.ProgrammingError},
        {"IntegrityError", &exceptions.IntegrityError}, {"DataError", &exceptions.DataError},
    };
    for (size_t index = 0; index < sizeof(wanted) / sizeof(wanted[0]); index++) {
        *wanted[index].slot = PyObject_GetAttrString(sqlite, wanted[index].name);
        if (*wanted[index].slot == NULL) {
            Py_DECREF(sqlite);
            return -1;
        }
    }
    Py_DECREF(sqlite);
    return 0;
}

PyMODINIT_FUNC PyInit__store(void) {
    if (load_exceptions() < 0 || PyType_Ready(&ConnectionType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&store_module);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(module, "Connection", (PyObject *)&ConnectionType) < 0
            || PyModule_AddStringConstant(module, "SQLITE_VERSION", sqlite3_libversion()) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
