/* Fixed-rate (open-loop) HTTP/1.1 load: the engine behind `python -m bench.openloop` (bench/openloop.py).

   One thread, epoll, non-blocking keep-alive TCP connections (TCP_NODELAY), one request at a time
   on each; every request is built before the clock starts, so one costs the client a send(), a
   recv() and the small response parser below. Request i is due at start + i / rate
   (CLOCK_MONOTONIC); the client sleeps until the next due time (absolute, 1 ns timer slack),
   collects the answers that came in meanwhile, then dispatches every request that is due. A
   dispatched request goes to the idle connection next in turn (round-robin over the connections,
   so --spread spreads) or, if none is idle, waits in a FIFO queue; its latency runs from dispatch
   to the last byte of the answer, queue wait included (no coordinated omission). Lateness
   (dispatch - due time) is recorded too. A connection lost with a request on it counts a
   connection error, is replaced, and the request is not resent. After the last due time the
   client waits up to DRAIN_TIMEOUT for outstanding answers, then prints one JSON line with the
   keys the asyncio client it replaced printed (bench/runs.py reads them).

   The last byte's time is the kernel's receive timestamp (SO_TIMESTAMPNS, CLOCK_REALTIME, so
   dispatch times are taken on that clock too), not the time this process got round to reading
   it: the client's own scheduling delays stay out of the latencies, and it need not wake up for
   every answer. Waking up costs more CPU than anything else the client does (~30 µs a time on
   the 2-core KVM guest this was written on), so it wakes for answers only while a request waits
   for a connection or while draining, and otherwise once per due time.

   cc -O2 -Wall -Wextra -std=gnu11 -o openloop openloop.c   (bench/openloop.py does this, cached) */

#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

typedef int64_t nanoseconds;

#define NS_PER_S INT64_C(1000000000)
#define DRAIN_TIMEOUT (5 * NS_PER_S)    /* how long outstanding answers are awaited after the last due time */
#define CONNECT_TIMEOUT (10 * NS_PER_S) /* for the first connections, before the clock starts */
#define MAX_REQUESTS 50000000.0         /* rate x (warmup + seconds); memory is ~32 bytes a request */
#define MAX_USERS 10000000L
#define LINE_LIMIT 8192 /* longest status, header, chunk-size or trailer line accepted */
#define READ_SIZE 65536
#define MAX_EVENTS 64

static const char USAGE[] =
    "usage: %s --url http://host:port/path --rate REQUESTS_PER_S --seconds S --body-file FILE\n"
    "       [--spread host:port,host:port] [--warmup S] [--connections N] [--users N] [--trace FILE]\n";

static const char HELP[] =
    "\nFixed-rate (open-loop) HTTP/1.1 load; prints one JSON line.\n\n"
    "  --url URL          http://host:port/path the requests go to (required)\n"
    "  --spread LIST      host:port,host:port to connect to instead of the URL's (round-robin)\n"
    "  --rate R           requests per second (required)\n"
    "  --seconds S        measured duration (required)\n"
    "  --warmup S         seconds sent first and not measured (default 1.0)\n"
    "  --connections N    keep-alive connections (default 32)\n"
    "  --users N          distinct X-User-ID values (default 1000)\n"
    "  --body-file FILE   the POST body (required)\n"
    "  --trace FILE       also write every measured answer to FILE, in dispatch order: one line\n"
    "                     'dispatched_s latency_ms' (seconds since the first measured dispatch),\n"
    "                     after a first line '# first dispatch at UNIX_S' (CLOCK_REALTIME)\n";

/* ---- command line ---------------------------------------------------------------------------- */

struct address {
    char text[300]; /* host:port, for messages */
    struct sockaddr_storage socket_address;
    socklen_t length;
};

struct options {
    const char *url, *spread, *body_file, *trace;
    double rate, seconds, warmup;
    long connections, users;
    bool have_rate, have_seconds;
};

static const char *program = "openloop";

/* "<program>: <prefix><message>" on stderr. */
static void print_message(const char *prefix, const char *format, va_list arguments)
{
    fprintf(stderr, "%s: %s", program, prefix);
    vfprintf(stderr, format, arguments);
    fputc('\n', stderr);
}

/* A bad command line: usage and the problem, exit status 2 (as argparse). */
static void __attribute__((noreturn, format(printf, 1, 2))) usage_error(const char *format, ...)
{
    va_list arguments;
    va_start(arguments, format);
    fprintf(stderr, USAGE, program);
    print_message("error: ", format, arguments);
    va_end(arguments);
    exit(2);
}

/* Anything else that stops the run: exit status 1. */
static void __attribute__((noreturn, format(printf, 1, 2))) die(const char *format, ...)
{
    va_list arguments;
    va_start(arguments, format);
    print_message("", format, arguments);
    va_end(arguments);
    exit(1);
}

static void *allocate(size_t count, size_t size)
{
    void *memory = calloc(count ? count : 1, size);
    if (memory == NULL)
        die("out of memory (%zu x %zu bytes)", count, size);
    return memory;
}

static double parse_number(const char *flag, const char *text)
{
    char *end;
    errno = 0;
    double value = strtod(text, &end);
    if (end == text || *end != '\0' || errno == ERANGE || !isfinite(value))
        usage_error("%s '%s' is not a number", flag, text);
    return value;
}

static long parse_integer(const char *flag, const char *text)
{
    char *end;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (end == text || *end != '\0' || errno == ERANGE)
        usage_error("%s '%s' is not an integer", flag, text);
    return value;
}

static struct options parse_options(int argc, char **argv)
{
    struct options options = {.warmup = 1.0, .connections = 32, .users = 1000};
    for (int index = 1; index < argc; index++) {
        char flag[64];
        const char *argument = argv[index], *value, *equals = strchr(argument, '=');
        if (strcmp(argument, "-h") == 0 || strcmp(argument, "--help") == 0) {
            printf(USAGE, program);
            fputs(HELP, stdout);
            exit(0);
        }
        if (strncmp(argument, "--", 2) != 0 || (equals ? (size_t)(equals - argument) : strlen(argument)) >= sizeof flag)
            usage_error("unrecognized argument '%s'", argument);
        if (equals) { /* --flag=value */
            snprintf(flag, sizeof flag, "%.*s", (int)(equals - argument), argument);
            value = equals + 1;
        } else {
            snprintf(flag, sizeof flag, "%s", argument);
            if (index + 1 >= argc || strncmp(argv[index + 1], "--", 2) == 0)
                usage_error("%s needs a value", flag);
            value = argv[++index];
        }
        if (strcmp(flag, "--url") == 0)
            options.url = value;
        else if (strcmp(flag, "--spread") == 0)
            options.spread = value;
        else if (strcmp(flag, "--trace") == 0)
            options.trace = value;
        else if (strcmp(flag, "--body-file") == 0)
            options.body_file = value;
        else if (strcmp(flag, "--rate") == 0) {
            options.rate = parse_number(flag, value);
            options.have_rate = true;
        } else if (strcmp(flag, "--seconds") == 0) {
            options.seconds = parse_number(flag, value);
            options.have_seconds = true;
        } else if (strcmp(flag, "--warmup") == 0)
            options.warmup = parse_number(flag, value);
        else if (strcmp(flag, "--connections") == 0)
            options.connections = parse_integer(flag, value);
        else if (strcmp(flag, "--users") == 0)
            options.users = parse_integer(flag, value);
        else
            usage_error("unrecognized argument '%s'", flag);
    }
    const char *missing = !options.url ? "--url" : !options.have_rate ? "--rate" : !options.have_seconds ? "--seconds"
                        : !options.body_file ? "--body-file" : NULL;
    if (missing)
        usage_error("%s is required", missing);
    if (options.rate <= 0)
        usage_error("--rate %g must be > 0", options.rate);
    if (options.seconds <= 0)
        usage_error("--seconds %g must be > 0", options.seconds);
    if (options.warmup < 0)
        usage_error("--warmup %g must be >= 0", options.warmup);
    if (options.connections < 1 || options.connections > 100000)
        usage_error("--connections %ld must be between 1 and 100000", options.connections);
    if (options.users < 1 || options.users > MAX_USERS)
        usage_error("--users %ld must be between 1 and %ld", options.users, MAX_USERS);
    if (options.rate * (options.warmup + options.seconds) > MAX_REQUESTS)
        usage_error("--rate x (--warmup + --seconds) is %.0f requests, more than %.0f",
                    options.rate * (options.warmup + options.seconds), MAX_REQUESTS);
    return options;
}

/* "host:port" or "[v6]:port" -> resolved `address` (NULL: only check the shape); false if it is not that shape. */
static bool resolve(const char *flag, const char *text, size_t length, struct address *address)
{
    char host[256], port[16];
    const char *colon = NULL;
    for (size_t at = length; at > 0; at--)
        if (text[at - 1] == ':') {
            colon = text + at - 1;
            break;
        }
    if (colon == NULL || colon == text || (size_t)(colon - text) >= sizeof host)
        return false;
    size_t host_length = (size_t)(colon - text), port_length = length - host_length - 1;
    const char *host_start = text;
    if (text[0] == '[' && colon[-1] == ']')
        host_start++, host_length -= 2;
    if (host_length == 0 || port_length == 0 || port_length > 5 || strspn(colon + 1, "0123456789") < port_length)
        return false;
    memcpy(host, host_start, host_length);
    host[host_length] = '\0';
    memcpy(port, colon + 1, port_length);
    port[port_length] = '\0';
    if (atoi(port) < 1 || atoi(port) > 65535)
        return false;
    if (address == NULL)
        return true;
    snprintf(address->text, sizeof address->text, "%.*s", (int)length, text);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV}, *found;
    int error = getaddrinfo(host, port, &hints, &found);
    if (error != 0)
        usage_error("%s: cannot resolve '%s': %s", flag, host, gai_strerror(error));
    memcpy(&address->socket_address, found->ai_addr, found->ai_addrlen);
    address->length = found->ai_addrlen;
    freeaddrinfo(found);
    return true;
}

/* ---- requests -------------------------------------------------------------------------------- */

struct request {
    char *bytes;
    size_t length;
};

/* One ready-to-send POST per user, as wrk's post.lua sends them. */
static struct request *build_requests(const char *host, const char *path, size_t path_length, const char *body,
                                      size_t body_length, long users)
{
    static const char HEAD[] = "POST %.*s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                               "X-User-ID: user-%ld\r\nContent-Length: %zu\r\n\r\n";
    struct request *requests = allocate((size_t)users, sizeof *requests);
    for (long user = 0; user < users; user++) {
        int head = snprintf(NULL, 0, HEAD, (int)path_length, path, host, user, body_length);
        struct request *request = &requests[user];
        request->length = (size_t)head + body_length;
        request->bytes = allocate(request->length + 1, 1);
        snprintf(request->bytes, (size_t)head + 1, HEAD, (int)path_length, path, host, user, body_length);
        memcpy(request->bytes + head, body, body_length);
    }
    return requests;
}

static char *read_file(const char *path, size_t *length)
{
    FILE *file = fopen(path, "rb");
    if (file == NULL)
        usage_error("--body-file '%s': %s", path, strerror(errno));
    size_t capacity = 4096, used = 0;
    char *bytes = allocate(capacity, 1);
    for (size_t got; (got = fread(bytes + used, 1, capacity - used, file)) > 0;) {
        used += got;
        if (used == capacity) {
            bytes = realloc(bytes, capacity *= 2);
            if (bytes == NULL)
                die("out of memory reading %s", path);
        }
    }
    if (ferror(file))
        usage_error("--body-file '%s': read error", path);
    fclose(file);
    *length = used;
    return bytes;
}

/* ---- response parser ------------------------------------------------------------------------- */

enum parse_state {
    STATUS_LINE,
    HEADER_LINE,
    BODY_LENGTH,
    CHUNK_SIZE_LINE,
    CHUNK_DATA,
    CHUNK_END_LINE,
    TRAILER_LINE,
    BODY_UNTIL_CLOSE,
    COMPLETE,
};

enum parse_result { PARSE_MORE, PARSE_DONE, PARSE_ERROR };

struct response {
    enum parse_state state;
    int status;
    bool http10, keep_alive, close, chunked, has_transfer_encoding, has_length;
    uint64_t length;    /* Content-Length */
    uint64_t remaining; /* body or chunk bytes still to come */
    size_t line_length;
    char line[LINE_LIMIT];
};

static void response_reset(struct response *response)
{
    response->state = STATUS_LINE;
    response->status = 0;
    response->http10 = response->keep_alive = response->close = false;
    response->chunked = response->has_transfer_encoding = response->has_length = false;
    response->line_length = 0;
}

static bool is_token_character(char character)
{
    return (character >= 'a' && character <= 'z') || (character >= 'A' && character <= 'Z')
           || (character >= '0' && character <= '9') || (character != '\0' && strchr("!#$%&'*+-.^_`|~", character));
}

static bool is_space(char character)
{
    return character == ' ' || character == '\t';
}

/* Whether a comma-separated header value lists `token` (case-insensitive); `last` = only as its last item. */
static bool lists_token(const char *value, const char *token, bool last)
{
    bool found = false;
    while (*value) {
        size_t length = strcspn(value, ",");
        const char *start = value, *end = value + length;
        while (start < end && is_space(*start))
            start++;
        while (end > start && is_space(end[-1]))
            end--;
        found = (size_t)(end - start) == strlen(token) && strncasecmp(start, token, strlen(token)) == 0;
        if (found && !last)
            return true;
        value += length + (value[length] == ',');
    }
    return found;
}

/* "HTTP/1.x 200 reason" */
static bool parse_status_line(struct response *response, const char *line, size_t length)
{
    if (length < 12 || strncmp(line, "HTTP/1.", 7) != 0 || (line[7] != '0' && line[7] != '1') || line[8] != ' ')
        return false;
    for (int digit = 9; digit < 12; digit++)
        if (line[digit] < '0' || line[digit] > '9')
            return false;
    if (length > 12 && line[12] != ' ')
        return false;
    response->http10 = line[7] == '0';
    response->status = (line[9] - '0') * 100 + (line[10] - '0') * 10 + (line[11] - '0');
    return true;
}

static bool parse_header_line(struct response *response, char *line)
{
    char *colon = strchr(line, ':');
    if (colon == NULL || colon == line)
        return false;
    for (const char *character = line; character < colon; character++)
        if (!is_token_character(*character)) /* also refuses obsolete line folding */
            return false;
    char *value = colon + 1, *end = value + strlen(value);
    while (is_space(*value))
        value++;
    while (end > value && is_space(end[-1]))
        *--end = '\0';
    size_t name_length = (size_t)(colon - line);
    if (name_length == 14 && strncasecmp(line, "Content-Length", 14) == 0) {
        if (*value == '\0' || strspn(value, "0123456789") != strlen(value) || strlen(value) > 18)
            return false;
        uint64_t length = strtoull(value, NULL, 10);
        if (response->has_length && length != response->length)
            return false;
        response->has_length = true;
        response->length = length;
    } else if (name_length == 17 && strncasecmp(line, "Transfer-Encoding", 17) == 0) {
        response->has_transfer_encoding = true;
        response->chunked = lists_token(value, "chunked", true);
    } else if (name_length == 10 && strncasecmp(line, "Connection", 10) == 0) {
        response->close |= lists_token(value, "close", false);
        response->keep_alive |= lists_token(value, "keep-alive", false);
    }
    return true;
}

/* After the blank line that ends the headers: how the body is delimited. */
static bool start_body(struct response *response)
{
    if (response->status == 101)
        return false; /* we never ask to switch protocols */
    if (response->status < 200) { /* 1xx interim response: the real one follows */
        response_reset(response);
        return true;
    }
    if (response->status == 204 || response->status == 304)
        response->state = COMPLETE;
    else if (response->has_transfer_encoding) /* overrides Content-Length */
        response->state = response->chunked ? CHUNK_SIZE_LINE : BODY_UNTIL_CLOSE;
    else if (response->has_length) {
        response->state = response->length ? BODY_LENGTH : COMPLETE;
        response->remaining = response->length;
    } else
        response->state = BODY_UNTIL_CLOSE;
    return true;
}

/* "1a3f[;extension]" */
static bool parse_chunk_size(struct response *response, const char *line)
{
    uint64_t size = 0;
    const char *character = line;
    for (; *character; character++) {
        int digit = *character >= '0' && *character <= '9'   ? *character - '0'
                    : *character >= 'a' && *character <= 'f' ? *character - 'a' + 10
                    : *character >= 'A' && *character <= 'F' ? *character - 'A' + 10
                                                             : -1;
        if (digit < 0)
            break;
        if (size >> 56)
            return false;
        size = size * 16 + (uint64_t)digit;
    }
    while (is_space(*character))
        character++;
    if (character == line || (*character != '\0' && *character != ';'))
        return false;
    response->remaining = size;
    response->state = size ? CHUNK_DATA : TRAILER_LINE;
    return true;
}

static bool parse_line(struct response *response, char *line, size_t length)
{
    switch (response->state) {
    case STATUS_LINE:
        response->state = HEADER_LINE;
        return parse_status_line(response, line, length);
    case HEADER_LINE:
        return length == 0 ? start_body(response) : parse_header_line(response, line);
    case CHUNK_SIZE_LINE:
        return parse_chunk_size(response, line);
    case CHUNK_END_LINE:
        response->state = CHUNK_SIZE_LINE;
        return length == 0;
    case TRAILER_LINE:
        if (length == 0)
            response->state = COMPLETE;
        return true;
    default:
        return false;
    }
}

/* Feed received bytes; DONE only when they end exactly with a complete response. */
static enum parse_result response_feed(struct response *response, const char *data, size_t size)
{
    size_t at = 0;
    while (at < size) {
        switch (response->state) {
        case BODY_LENGTH:
        case CHUNK_DATA: {
            size_t take = size - at < response->remaining ? size - at : (size_t)response->remaining;
            at += take;
            response->remaining -= take;
            if (response->remaining == 0)
                response->state = response->state == BODY_LENGTH ? COMPLETE : CHUNK_END_LINE;
            break;
        }
        case BODY_UNTIL_CLOSE:
            return PARSE_MORE;
        case COMPLETE:
            return PARSE_ERROR; /* bytes beyond the response */
        default: {              /* a line: status, header, chunk size, chunk end or trailer */
            const char *newline = memchr(data + at, '\n', size - at);
            size_t piece = newline ? (size_t)(newline - (data + at)) + 1 : size - at;
            if (response->line_length + piece >= LINE_LIMIT)
                return PARSE_ERROR;
            memcpy(response->line + response->line_length, data + at, piece);
            response->line_length += piece;
            at += piece;
            if (newline == NULL)
                return PARSE_MORE;
            size_t length = response->line_length - 1;
            if (length > 0 && response->line[length - 1] == '\r')
                length--;
            response->line[length] = '\0';
            response->line_length = 0;
            if (!parse_line(response, response->line, length))
                return PARSE_ERROR;
        }
        }
    }
    return response->state == COMPLETE ? PARSE_DONE : PARSE_MORE;
}

static bool response_keeps_alive(const struct response *response)
{
    return !response->close && (!response->http10 || response->keep_alive);
}

/* ---- connections and the schedule ------------------------------------------------------------ */

enum connection_state {
    DEAD,
    CONNECTING,
    IDLE,
    BUSY,
    ANSWERED, /* its answer just recorded: neither busy nor idle until the caller decides */
};

struct connection {
    int fd;
    uint32_t generation; /* bumped on every (re)connect: events of a socket closed earlier are ignored */
    uint32_t events;     /* the epoll interest set */
    enum connection_state state;
    const struct address *address;
    uint64_t request; /* the one in flight (index into the schedule) */
    size_t written;
    nanoseconds dispatched;   /* CLOCK_REALTIME, like the receive timestamps */
    nanoseconds last_arrival; /* of the answer's bytes so far (CLOCK_REALTIME) */
    struct response response;
};

struct pending {
    uint64_t request;
    nanoseconds dispatched; /* CLOCK_REALTIME */
};

struct client {
    double rate;
    uint64_t total, first_measured;
    struct request *requests;
    size_t request_count;
    struct connection *connections;
    size_t connection_count, idle_count, idle_cursor;
    int epoll;
    bool sending; /* false while the first connections are made: a failure then is fatal */
    struct pending *waiting; /* FIFO of dispatched requests without a connection; each enters it once */
    uint64_t waiting_head, waiting_tail;
    uint64_t outstanding; /* dispatched, neither answered nor failed */
    /* the measured part */
    nanoseconds *latencies, *late;
    nanoseconds *dispatched; /* per measured answer, beside latencies; only with --trace */
    uint64_t sent, completed, non_2xx, connection_errors, queued;
    char buffer[READ_SIZE];
};

static nanoseconds clock_now(clockid_t clock)
{
    struct timespec now;
    clock_gettime(clock, &now);
    return (nanoseconds)now.tv_sec * NS_PER_S + now.tv_nsec;
}

static void replace(struct client *client, struct connection *connection);
static void connection_ready(struct client *client, struct connection *connection);

static void watch(struct client *client, struct connection *connection, uint32_t events)
{
    if (connection->events == events)
        return;
    struct epoll_event event = {.events = events,
                                .data.u64 = (uint64_t)connection->generation << 32
                                            | (uint64_t)(connection - client->connections)};
    if (epoll_ctl(client->epoll, connection->events ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, connection->fd, &event) < 0)
        die("epoll_ctl: %s", strerror(errno));
    connection->events = events;
}

static void connect_failed(struct client *client, struct connection *connection, int error)
{
    if (!client->sending)
        die("cannot connect to %s: %s", connection->address->text, strerror(error));
    close(connection->fd);
    connection->state = DEAD; /* like the Python client: a failed replacement is counted, not retried */
    client->connection_errors++;
}

static void open_connection(struct client *client, struct connection *connection)
{
    const struct address *address = connection->address;
    connection->generation++;
    connection->events = 0;
    connection->state = CONNECTING;
    connection->fd = socket(address->socket_address.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (connection->fd < 0)
        die("socket: %s", strerror(errno));
    int on = 1;
    setsockopt(connection->fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
    setsockopt(connection->fd, SOL_SOCKET, SO_TIMESTAMPNS, &on, sizeof on);
    if (connect(connection->fd, (const struct sockaddr *)&address->socket_address, address->length) < 0
        && errno != EINPROGRESS) {
        connect_failed(client, connection, errno);
        return;
    }
    watch(client, connection, EPOLLIN | EPOLLOUT); /* writable = connected (or failed: SO_ERROR says) */
}

static void finish_connect(struct client *client, struct connection *connection)
{
    int error = 0;
    socklen_t length = sizeof error;
    if (getsockopt(connection->fd, SOL_SOCKET, SO_ERROR, &error, &length) < 0)
        error = errno;
    if (error != 0) {
        connect_failed(client, connection, error);
        return;
    }
    watch(client, connection, EPOLLIN);
    connection_ready(client, connection);
}

static void write_request(struct client *client, struct connection *connection)
{
    const struct request *request = &client->requests[connection->request % client->request_count];
    while (connection->written < request->length) {
        ssize_t sent = send(connection->fd, request->bytes + connection->written, request->length - connection->written,
                            MSG_NOSIGNAL);
        if (sent < 0 && errno == EINTR)
            continue;
        if (sent < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            watch(client, connection, EPOLLIN | EPOLLOUT);
            return;
        }
        if (sent < 0) {
            replace(client, connection);
            return;
        }
        connection->written += (size_t)sent;
    }
    watch(client, connection, EPOLLIN);
}

static void send_request(struct client *client, struct connection *connection, uint64_t request, nanoseconds dispatched)
{
    connection->state = BUSY;
    connection->request = request;
    connection->written = 0;
    connection->dispatched = connection->last_arrival = dispatched;
    response_reset(&connection->response);
    write_request(client, connection);
}

/* A connection with nothing in flight takes the oldest waiting request, or joins the idle ones. */
static void connection_ready(struct client *client, struct connection *connection)
{
    if (client->waiting_head < client->waiting_tail) {
        struct pending next = client->waiting[client->waiting_head++];
        send_request(client, connection, next.request, next.dispatched);
    } else {
        connection->state = IDLE;
        client->idle_count++;
    }
}

/* The idle connection next in turn after the last one used (round-robin over the slots). */
static struct connection *take_idle(struct client *client)
{
    if (client->idle_count == 0)
        return NULL;
    for (size_t step = 0; step < client->connection_count; step++) {
        size_t index = (client->idle_cursor + step) % client->connection_count;
        if (client->connections[index].state == IDLE) {
            client->idle_cursor = index + 1;
            client->idle_count--;
            return &client->connections[index];
        }
    }
    die("no idle connection although %zu are counted", client->idle_count);
}

static bool is_measured(const struct client *client, uint64_t request)
{
    return request >= client->first_measured;
}

/* Close the connection (a request still on it counts as failed) and open a new one in its slot. */
static void replace(struct client *client, struct connection *connection)
{
    if (connection->state == BUSY) {
        client->outstanding--;
        client->connection_errors += is_measured(client, connection->request);
    } else if (connection->state == IDLE) {
        client->idle_count--;
    }
    close(connection->fd);
    connection->state = DEAD;
    open_connection(client, connection);
}

static void record_answer(struct client *client, struct connection *connection, nanoseconds finished)
{
    client->outstanding--;
    connection->state = ANSWERED;
    if (!is_measured(client, connection->request))
        return;
    if (client->dispatched)
        client->dispatched[client->completed] = connection->dispatched;
    client->latencies[client->completed++] = finished - connection->dispatched;
    client->non_2xx += connection->response.status < 200 || connection->response.status >= 300;
}

/* When the bytes just read reached this host: the kernel's timestamp, or now if it gave none (or a
   time outside the request's lifetime, as after a clock step). */
static nanoseconds arrival(const struct connection *connection, struct msghdr *message)
{
    nanoseconds now = clock_now(CLOCK_REALTIME);
    for (struct cmsghdr *control = CMSG_FIRSTHDR(message); control; control = CMSG_NXTHDR(message, control)) {
        if (control->cmsg_level != SOL_SOCKET || control->cmsg_type != SCM_TIMESTAMPNS)
            continue;
        struct timespec stamp;
        memcpy(&stamp, CMSG_DATA(control), sizeof stamp);
        nanoseconds arrived = (nanoseconds)stamp.tv_sec * NS_PER_S + stamp.tv_nsec;
        if (arrived >= connection->dispatched && arrived <= now)
            return arrived;
    }
    return now;
}

static void receive(struct client *client, struct connection *connection)
{
    union {
        char bytes[CMSG_SPACE(sizeof(struct timespec))];
        struct cmsghdr align;
    } control;
    struct iovec buffer = {.iov_base = client->buffer, .iov_len = sizeof client->buffer};
    struct msghdr message = {.msg_iov = &buffer, .msg_iovlen = 1, .msg_control = control.bytes,
                             .msg_controllen = sizeof control.bytes};
    ssize_t got = recvmsg(connection->fd, &message, 0);
    if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return;
    if (got <= 0) { /* closed or reset by the server */
        if (got == 0 && connection->state == BUSY && connection->response.state == BODY_UNTIL_CLOSE)
            record_answer(client, connection, connection->last_arrival);
        replace(client, connection);
        return;
    }
    if (connection->state != BUSY) { /* bytes nobody asked for: the stream cannot be trusted */
        client->connection_errors++;
        replace(client, connection);
        return;
    }
    connection->last_arrival = arrival(connection, &message);
    switch (response_feed(&connection->response, client->buffer, (size_t)got)) {
    case PARSE_MORE:
        return;
    case PARSE_ERROR:
        replace(client, connection);
        return;
    case PARSE_DONE:
        break;
    }
    const struct request *request = &client->requests[connection->request % client->request_count];
    bool reusable = response_keeps_alive(&connection->response) && connection->written == request->length;
    record_answer(client, connection, connection->last_arrival);
    if (reusable)
        connection_ready(client, connection);
    else
        replace(client, connection);
}

static void on_event(struct client *client, uint64_t data, uint32_t events)
{
    struct connection *connection = &client->connections[(uint32_t)data];
    uint32_t generation = (uint32_t)(data >> 32);
    if (connection->generation != generation || connection->state == DEAD)
        return; /* its socket was closed earlier in this batch */
    if (connection->state == CONNECTING) {
        finish_connect(client, connection);
        return;
    }
    if ((events & EPOLLOUT) && connection->state == BUSY)
        write_request(client, connection);
    if ((events & (EPOLLIN | EPOLLHUP | EPOLLERR)) && connection->generation == generation
        && (connection->state == IDLE || connection->state == BUSY))
        receive(client, connection);
}

/* Handle socket events until `wake` (CLOCK_MONOTONIC), returning at the first batch of them or,
   with `only_at_wake`, sleeping through them to `wake` and then handling all that are ready. */
static void wait_for_events(struct client *client, nanoseconds wake, bool only_at_wake)
{
    struct epoll_event events[MAX_EVENTS];
    nanoseconds timeout = 0;
    if (only_at_wake) {
        struct timespec until = {.tv_sec = wake / NS_PER_S, .tv_nsec = wake % NS_PER_S};
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &until, NULL);
    } else {
        timeout = wake - clock_now(CLOCK_MONOTONIC);
        timeout = timeout < 0 ? 0 : timeout;
    }
    int count;
    do {
        struct timespec wait = {.tv_sec = timeout / NS_PER_S, .tv_nsec = timeout % NS_PER_S};
        count = epoll_pwait2(client->epoll, events, MAX_EVENTS, &wait, NULL);
        if (count < 0 && errno != EINTR)
            die("epoll_pwait2: %s", strerror(errno));
        for (int index = 0; index < count; index++)
            on_event(client, events[index].data.u64, events[index].events);
        timeout = 0;
    } while (count == MAX_EVENTS); /* more may be ready */
}

static void dispatch(struct client *client, uint64_t request, nanoseconds now)
{
    client->outstanding++;
    struct connection *connection = take_idle(client);
    if (connection != NULL) {
        send_request(client, connection, request, now);
        return;
    }
    client->queued += is_measured(client, request);
    client->waiting[client->waiting_tail++] = (struct pending){.request = request, .dispatched = now};
}

static nanoseconds due(const struct client *client, nanoseconds start, uint64_t request)
{
    return start + (nanoseconds)((double)request * (double)NS_PER_S / client->rate);
}

static double cpu_seconds(const struct rusage *usage)
{
    return (double)usage->ru_utime.tv_sec + (double)usage->ru_utime.tv_usec / 1e6 + (double)usage->ru_stime.tv_sec
           + (double)usage->ru_stime.tv_usec / 1e6;
}

/* Connect, send on schedule, wait for the stragglers; the time from start to the end of sending, and the CPU used. */
static void run(struct client *client, nanoseconds *sending_time, double *cpu_s)
{
    for (size_t index = 0; index < client->connection_count; index++)
        open_connection(client, &client->connections[index]);
    nanoseconds give_up = clock_now(CLOCK_MONOTONIC) + CONNECT_TIMEOUT;
    while (client->idle_count < client->connection_count) {
        if (clock_now(CLOCK_MONOTONIC) >= give_up)
            die("%zu of %zu connections not made within %" PRId64 " s", client->connection_count - client->idle_count,
                client->connection_count, CONNECT_TIMEOUT / NS_PER_S);
        wait_for_events(client, give_up, false);
    }
    client->sending = true;
    nanoseconds start = clock_now(CLOCK_MONOTONIC), sending_ended = -1;
    struct rusage before, after;
    getrusage(RUSAGE_SELF, &before);
    uint64_t next = 0;
    for (;;) {
        nanoseconds now = clock_now(CLOCK_MONOTONIC), now_real = clock_now(CLOCK_REALTIME);
        for (; next < client->total && due(client, start, next) <= now; next++) {
            if (is_measured(client, next))
                client->late[client->sent++] = now - due(client, start, next);
            dispatch(client, next, now_real);
        }
        if (now < due(client, start, next)) { /* sending lasts until the due time after the last request */
            bool someone_waits = client->waiting_head < client->waiting_tail;
            wait_for_events(client, due(client, start, next), !someone_waits);
            continue;
        }
        if (sending_ended < 0)
            sending_ended = now;
        if (client->outstanding == 0 || now >= sending_ended + DRAIN_TIMEOUT)
            break;
        wait_for_events(client, sending_ended + DRAIN_TIMEOUT, false);
    }
    getrusage(RUSAGE_SELF, &after);
    *sending_time = sending_ended - start;
    *cpu_s = cpu_seconds(&after) - cpu_seconds(&before);
}

/* ---- summary --------------------------------------------------------------------------------- */

static int compare_nanoseconds(const void *left, const void *right)
{
    nanoseconds a = *(const nanoseconds *)left, b = *(const nanoseconds *)right;
    return (a > b) - (a < b);
}

/* Nearest-rank percentile (q in 0-100) of sorted values, in ms; NaN if there are none. */
static double percentile_ms(const nanoseconds *sorted, uint64_t count, double q)
{
    if (count == 0)
        return NAN;
    double exact = (double)count * q / 100.0;
    uint64_t rank = (uint64_t)exact;
    rank += (double)rank < exact; /* ceil */
    rank = rank < 1 ? 1 : rank > count ? count : rank;
    return (double)sorted[rank - 1] / 1e6;
}

/* Like Python's round(value, decimals): glibc's printf rounds the exact binary value correctly. */
static double round_to(double value, int decimals)
{
    char text[400];
    if (!isfinite(value))
        return value;
    snprintf(text, sizeof text, "%.*f", decimals, value);
    return strtod(text, NULL);
}

/* A float as Python's json writes it (shortest form that reads back, 12.0 not 12); null for NaN or infinity. */
static void print_number(double value)
{
    char text[400];
    if (!isfinite(value)) {
        fputs("null", stdout);
        return;
    }
    double magnitude = value < 0 ? -value : value;
    if (magnitude == 0 || (magnitude >= 1e-4 && magnitude < 1e16)) {
        for (int decimals = 1; decimals <= 17; decimals++) {
            snprintf(text, sizeof text, "%.*f", decimals, value);
            if (strtod(text, NULL) == value)
                break;
        }
    } else {
        snprintf(text, sizeof text, "%.17g", value);
    }
    fputs(text, stdout);
}

static int compare_trace_lines(const void *left, const void *right)
{
    const nanoseconds *a = left, *b = right;
    return (a[0] > b[0]) - (a[0] < b[0]);
}

/* --trace: every measured answer as 'dispatched_s latency_ms', in dispatch order (answers arrive out of it),
   after a comment line with the first dispatch's wall-clock time, so samples taken elsewhere line up with it. */
static void write_trace(const struct client *client, const char *path)
{
    nanoseconds *pairs = allocate(client->completed ? client->completed * 2 : 1, sizeof *pairs);
    for (uint64_t index = 0; index < client->completed; index++) {
        pairs[2 * index] = client->dispatched[index];
        pairs[2 * index + 1] = client->latencies[index];
    }
    qsort(pairs, client->completed, 2 * sizeof *pairs, compare_trace_lines);
    FILE *file = fopen(path, "w");
    if (file == NULL)
        die("--trace '%s': %s", path, strerror(errno));
    fprintf(file, "# first dispatch at %.6f\n", client->completed ? (double)pairs[0] / 1e9 : 0.0);
    for (uint64_t index = 0; index < client->completed; index++)
        fprintf(file, "%.6f %.3f\n", (double)(pairs[2 * index] - pairs[0]) / 1e9, (double)pairs[2 * index + 1] / 1e6);
    if (fclose(file) != 0)
        die("--trace '%s': write error", path);
    free(pairs);
}

static void print_summary(struct client *client, double measured_s, double cpu_s)
{
    static const struct {
        const char *name;
        double q;
    } PERCENTILES[] = {{"p50", 50}, {"p90", 90}, {"p99", 99}, {"p99.9", 99.9}, {"p100", 100}};
    qsort(client->latencies, client->completed, sizeof *client->latencies, compare_nanoseconds);
    qsort(client->late, client->sent, sizeof *client->late, compare_nanoseconds);
    fputs("{\"rate\": ", stdout);
    print_number(client->rate);
    fputs(", \"seconds\": ", stdout);
    print_number(round_to(measured_s, 3));
    printf(", \"sent\": %" PRIu64 ", \"completed\": %" PRIu64 ", \"errors\": %" PRIu64 ", \"non_2xx\": %" PRIu64
           ", \"connection_errors\": %" PRIu64 ", \"queued\": %" PRIu64 ", \"achieved_rps\": ",
           client->sent, client->completed, client->non_2xx + client->sent - client->completed, client->non_2xx,
           client->connection_errors, client->queued);
    print_number(measured_s > 0 ? round_to((double)client->completed / measured_s, 1) : 0.0);
    fputs(", \"latency_ms\": {", stdout);
    for (size_t index = 0; index < sizeof PERCENTILES / sizeof *PERCENTILES; index++) {
        printf("%s\"%s\": ", index ? ", " : "", PERCENTILES[index].name);
        print_number(round_to(percentile_ms(client->latencies, client->completed, PERCENTILES[index].q), 3));
    }
    fputs("}, \"late_ms_p99\": ", stdout);
    print_number(round_to(percentile_ms(client->late, client->sent, 99), 3));
    fputs(", \"client_cpu_s\": ", stdout);
    print_number(round_to(cpu_s, 3));
    fputs("}\n", stdout);
    if (fflush(stdout) != 0)
        die("cannot write the summary: %s", strerror(errno));
}

/* ---- main ------------------------------------------------------------------------------------ */

int main(int argc, char **argv)
{
    if (argc > 0 && argv[0][0] != '\0')
        program = argv[0];
    struct options options = parse_options(argc, argv);

    const char *url = options.url;
    if (strncmp(url, "http://", 7) != 0)
        usage_error("--url '%s' must be http://host:port/path", url);
    const char *netloc = url + 7;
    size_t netloc_length = strcspn(netloc, "/?#");
    const char *path = netloc + netloc_length;
    size_t path_length = strcspn(path, "?#"); /* the path only, as the Python client sent it */
    if (memchr(netloc, '@', netloc_length) || !resolve("--url", netloc, netloc_length, NULL))
        usage_error("--url '%s' must be http://host:port/path", url);
    char *host = strndup(netloc, netloc_length);

    size_t address_count = 0;
    struct address *addresses = allocate(options.spread ? strlen(options.spread) / 2 + 1 : 1, sizeof *addresses);
    for (const char *item = options.spread ? options.spread : ""; *item;) {
        size_t length = strcspn(item, ",");
        if (length > 0 && !resolve("--spread", item, length, &addresses[address_count++]))
            usage_error("--spread '%s': '%.*s' is not host:port", options.spread, (int)length, item);
        item += length + (item[length] == ',');
    }
    if (address_count == 0) /* no --spread: the URL's own host, resolved only then */
        resolve("--url", netloc, netloc_length, &addresses[address_count++]);

    size_t body_length;
    char *body = read_file(options.body_file, &body_length);

    struct client *client = allocate(1, sizeof *client);
    client->rate = options.rate;
    client->total = (uint64_t)(options.rate * (options.warmup + options.seconds));
    client->first_measured = (uint64_t)(options.rate * options.warmup);
    client->requests = build_requests(host, path_length ? path : "/", path_length ? path_length : 1, body, body_length,
                                      options.users);
    client->request_count = (size_t)options.users;
    client->connection_count = (size_t)options.connections;
    client->connections = allocate(client->connection_count, sizeof *client->connections);
    for (size_t index = 0; index < client->connection_count; index++)
        client->connections[index].address = &addresses[index % address_count];
    client->waiting = allocate(client->total, sizeof *client->waiting);
    client->latencies = allocate(client->total, sizeof *client->latencies);
    client->late = allocate(client->total, sizeof *client->late);
    if (options.trace)
        client->dispatched = allocate(client->total, sizeof *client->dispatched);
    client->epoll = epoll_create1(EPOLL_CLOEXEC);
    if (client->epoll < 0)
        die("epoll_create1: %s", strerror(errno));
    prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL); /* wake at the due time, not up to 50 µs after it */

    nanoseconds sending;
    double cpu_s;
    run(client, &sending, &cpu_s);
    if (options.trace)
        write_trace(client, options.trace); /* before print_summary sorts the latencies */
    print_summary(client, (double)sending / 1e9 - options.warmup, cpu_s);
    return 0;
}
