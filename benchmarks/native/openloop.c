/* openloop: an open-loop load generator for the overload and soak benchmarks, in C so that the generator takes a
 * small share of the cores it shares with the server (the Python generators spend 30 us (HTTP) and 140 us (gRPC)
 * of CPU per request; this one a few).
 *
 *   openloop http|grpc HOST PORT RATE SECONDS CONNECTIONS REQUEST_FILE [GRPC_PATH]
 *
 * Request i is due at start + i / RATE whatever the server does, and its latency counts from then (no coordinated
 * omission). RATE "closed:N" is a closed loop instead: N requests out at any time, each answer followed at once
 * by the next request, for SECONDS (what the server answers so is its capacity). http: REQUEST_FILE holds one whole HTTP/1.1 request (head and body), sent as is on at most
 * CONNECTIONS keep-alive connections, one request at a time each; a request due while all are busy waits for the
 * next free one. grpc: REQUEST_FILE holds one serialized protobuf message, sent as a unary call to GRPC_PATH
 * (h2c, libnghttp2) as a new stream on one of CONNECTIONS connections in turn; a connection the server ends
 * (GOAWAY, e.g. its max connection age) is replaced, and the calls it did not take are sent again on another.
 * A request not answered TIMEOUT_S after it was due is given up.
 *
 * Output, one line per request on stdout, tab-separated: due, sent, done (CLOCK_MONOTONIC seconds, as Python's
 * time.monotonic()), code (HTTP status, or gRPC status; -1: no answer) and message (a refusal's body or
 * grpc-message, cut to 160 bytes; "timeout" / "connection lost" when code is -1).
 *
 * Build: cc -O2 -o openloop openloop.c -lnghttp2 (Debian: apt-get install gcc libnghttp2-dev).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <nghttp2/nghttp2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define TIMEOUT_S 10.0
#define MESSAGE_MAX 160
#define BUFFER_SIZE (1 << 16)

typedef struct {
    double due, sent, done;
    int code;  /* -2: not finished */
    char message[MESSAGE_MAX + 1];
} Record;

typedef struct Call Call;

typedef struct Connection {
    int fd, connected, draining, dead;
    long in_flight;  /* http: the record in flight (-1: idle); grpc: streams open */
    char *buffer;    /* http: what came in of the answer */
    size_t used;
    size_t out_off;  /* http: bytes of the request already written */
    nghttp2_session *session;
    Call *calls;     /* grpc: the calls open on it */
} Connection;

static Record *records;
static long total, issued, next_pending;  /* requests due so far: [0, issued); sent: all below next_pending
                                                 but those in the retry list */
static long closed_n, completed;  /* closed loop: requests kept out, and answered so far */
static long opened, closed_by_server, lost;  /* connections: for the summary on stderr */
static long *retry;  /* grpc: calls a closing connection did not take, to send again */
static long retry_count;
static Connection *connections;
static int connection_count, epoll_fd, grpc_mode, round_robin;
static const char *host, *grpc_path;
static int port;
static char *request;
static size_t request_size;

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void finish(long i, int code, const char *message, size_t length) {
    Record *r = &records[i];
    if (r->code != -2) return;
    completed++;
    r->done = now_s();
    r->code = code;
    if (length > MESSAGE_MAX) length = MESSAGE_MAX;
    for (size_t k = 0; k < length; k++) {
        char c = message[k];
        r->message[k] = (c == '\t' || c == '\n' || c == '\r') ? ' ' : c;
    }
    r->message[length] = 0;
}

static void watch(Connection *c, unsigned events, int op) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    epoll_ctl(epoll_fd, op, c->fd, &ev);
}

static int open_socket(void) {
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *found;
    char service[16];
    snprintf(service, sizeof service, "%d", port);
    if (getaddrinfo(host, service, &hints, &found) != 0) return -1;
    int fd = socket(found->ai_family, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, found->ai_addr, found->ai_addrlen) < 0 && errno != EINPROGRESS) {
        close(fd);
        fd = -1;
    }
    freeaddrinfo(found);
    return fd;
}

/* ---- gRPC over nghttp2 ---------------------------------------------------------------------------------- */

struct Call {
    long record;
    int grpc_status;  /* -1 until the trailers (or a trailers-only answer) give it */
    char message[MESSAGE_MAX + 1];
    size_t message_length, body_off;
    Call *prev, *next;
};

static void unlink_call(Connection *c, Call *call) {
    if (call->prev) call->prev->next = call->next;
    else c->calls = call->next;
    if (call->next) call->next->prev = call->prev;
}

static ssize_t read_body(nghttp2_session *s, int32_t stream, uint8_t *out, size_t length, uint32_t *flags,
                         nghttp2_data_source *source, void *user) {
    (void)s, (void)stream, (void)user;
    Call *call = source->ptr;
    size_t left = request_size + 5 - call->body_off, n = left < length ? left : length;
    uint8_t prefix[5] = {0, (uint8_t)(request_size >> 24), (uint8_t)(request_size >> 16),
                         (uint8_t)(request_size >> 8), (uint8_t)request_size};
    for (size_t k = 0; k < n; k++) {
        size_t at = call->body_off + k;
        out[k] = at < 5 ? prefix[at] : (uint8_t)request[at - 5];
    }
    call->body_off += n;
    if (call->body_off == request_size + 5) *flags |= NGHTTP2_DATA_FLAG_EOF;
    return (ssize_t)n;
}

static int submit_call(Connection *c, long i) {
    Call *call = calloc(1, sizeof *call);
    call->record = i;
    call->grpc_status = -1;
    char authority[300];
    snprintf(authority, sizeof authority, "%s:%d", host, port);
#define HEADER(n, v) {(uint8_t *)(n), (uint8_t *)(v), sizeof(n) - 1, strlen(v), NGHTTP2_NV_FLAG_NONE}
    nghttp2_nv headers[] = {HEADER(":method", "POST"), HEADER(":scheme", "http"), HEADER(":path", grpc_path),
                            HEADER(":authority", authority), HEADER("content-type", "application/grpc"),
                            HEADER("te", "trailers"), HEADER("grpc-timeout", "10S")};
    nghttp2_data_provider body = {.source.ptr = call, .read_callback = read_body};
    int32_t stream = nghttp2_submit_request(c->session, NULL, headers, sizeof headers / sizeof *headers, &body, call);
    if (stream < 0) {
        free(call);
        return -1;
    }
    call->next = c->calls;
    if (c->calls) c->calls->prev = call;
    c->calls = call;
    c->in_flight++;
    return 0;
}

static int on_header(nghttp2_session *s, const nghttp2_frame *frame, const uint8_t *name, size_t name_length,
                     const uint8_t *value, size_t value_length, uint8_t flags, void *user) {
    (void)flags, (void)user;
    Call *call = nghttp2_session_get_stream_user_data(s, frame->hd.stream_id);
    if (!call) return 0;
    if (name_length == 11 && !memcmp(name, "grpc-status", 11)) {
        call->grpc_status = atoi((const char *)value);
    } else if (name_length == 12 && !memcmp(name, "grpc-message", 12)) {
        call->message_length = value_length < MESSAGE_MAX ? value_length : MESSAGE_MAX;
        memcpy(call->message, value, call->message_length);
    }
    return 0;
}

static int on_frame(nghttp2_session *s, const nghttp2_frame *frame, void *user) {
    (void)s;
    Connection *c = user;
    if (frame->hd.type == NGHTTP2_GOAWAY && !c->draining) {  /* no new calls here; it closes when idle */
        c->draining = 1;
        closed_by_server++;
    }
    return 0;
}

static int on_stream_close(nghttp2_session *s, int32_t stream, uint32_t error, void *user) {
    Connection *c = user;
    Call *call = nghttp2_session_get_stream_user_data(s, stream);
    if (!call || c->dead) return 0;
    unlink_call(c, call);
    c->in_flight--;
    if (call->grpc_status >= 0) {
        finish(call->record, call->grpc_status, call->message, call->message_length);
    } else if (error == NGHTTP2_REFUSED_STREAM) {
        retry[retry_count++] = call->record;  /* the server never took it: send it again elsewhere */
    } else {
        char message[64];
        int n = snprintf(message, sizeof message, "stream reset (HTTP/2 error %u)", error);
        finish(call->record, -1, message, (size_t)n);
    }
    free(call);
    return 0;
}

static ssize_t send_bytes(nghttp2_session *s, const uint8_t *data, size_t length, int flags, void *user) {
    (void)s, (void)flags;
    Connection *c = user;
    ssize_t n = write(c->fd, data, length);
    if (n < 0) return errno == EAGAIN ? NGHTTP2_ERR_WOULDBLOCK : NGHTTP2_ERR_CALLBACK_FAILURE;
    return n;
}

static void start_session(Connection *c) {
    nghttp2_session_callbacks *callbacks;
    nghttp2_session_callbacks_new(&callbacks);
    nghttp2_session_callbacks_set_send_callback(callbacks, send_bytes);
    nghttp2_session_callbacks_set_on_header_callback(callbacks, on_header);
    nghttp2_session_callbacks_set_on_frame_recv_callback(callbacks, on_frame);
    nghttp2_session_callbacks_set_on_stream_close_callback(callbacks, on_stream_close);
    nghttp2_session_client_new(&c->session, callbacks, c);
    nghttp2_session_callbacks_del(callbacks);
    nghttp2_settings_entry window = {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, 1 << 24};
    nghttp2_submit_settings(c->session, NGHTTP2_FLAG_NONE, &window, 1);
    nghttp2_session_set_local_window_size(c->session, NGHTTP2_FLAG_NONE, 0, 1 << 26);
}

/* ---- connections ------------------------------------------------------------------------------------------ */

static void close_connection(Connection *c, const char *why) {
    if (c->fd < 0) return;
    if (!strcmp(why, "connection lost")) lost++;
    epoll_ctl(epoll_fd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    c->connected = c->draining = 0;
    if (grpc_mode) {
        while (c->calls) {
            Call *call = c->calls;
            unlink_call(c, call);
            finish(call->record, -1, why, strlen(why));
            free(call);
        }
        c->dead = 1;  /* the session's streams go with it, their calls already failed */
        nghttp2_session_del(c->session);
        c->session = NULL;
        c->dead = 0;
        c->in_flight = 0;
    } else if (c->in_flight >= 0) {
        finish(c->in_flight, -1, why, strlen(why));
        c->in_flight = -1;
    }
    c->used = c->out_off = 0;
}

static void open_connection(Connection *c) {
    c->fd = open_socket();
    if (c->fd < 0) return;
    opened++;
    c->connected = 0;
    c->in_flight = grpc_mode ? 0 : -1;
    c->used = c->out_off = 0;
    if (grpc_mode) start_session(c);
    watch(c, EPOLLIN | EPOLLOUT, EPOLL_CTL_ADD);
}

static void flush_grpc(Connection *c) {
    if (nghttp2_session_send(c->session) != 0) close_connection(c, "connection lost");
    else watch(c, EPOLLIN | (nghttp2_session_want_write(c->session) ? EPOLLOUT : 0), EPOLL_CTL_MOD);
}

static void write_http(Connection *c) {
    while (c->out_off < request_size) {
        ssize_t n = write(c->fd, request + c->out_off, request_size - c->out_off);
        if (n < 0) {
            if (errno == EAGAIN) {
                watch(c, EPOLLIN | EPOLLOUT, EPOLL_CTL_MOD);
                return;
            }
            close_connection(c, "connection lost");
            return;
        }
        c->out_off += (size_t)n;
    }
    watch(c, EPOLLIN, EPOLL_CTL_MOD);
}

static long next_request(void) {
    while (retry_count) {
        long i = retry[--retry_count];
        if (records[i].code == -2) return i;  /* not given up on meanwhile */
    }
    return next_pending < issued ? next_pending++ : -1;
}

static int has_request(void) {
    return retry_count > 0 || next_pending < issued;
}

static int usable(const Connection *c) {
    return c->fd >= 0 && c->connected && !c->draining;
}

/* Opens connections for the requests waiting: gRPC all of them at once; HTTP only as many as there are requests
 * with no idle or opening connection to take them (as a pool grows). */
static void open_connections(void) {
    long waiting = (issued - next_pending) + retry_count, free = 0;
    for (int k = 0; k < connection_count; k++) {
        const Connection *c = &connections[k];
        if (c->fd >= 0 && (!c->connected || (!grpc_mode && c->in_flight < 0))) free++;
    }
    for (int k = 0; k < connection_count && (grpc_mode ? waiting > 0 : waiting > free); k++) {
        Connection *c = &connections[k];
        if (c->fd >= 0 || c->draining) continue;
        open_connection(c);
        if (c->fd >= 0) free++;
    }
}

static void dispatch(void) {
    open_connections();
    if (grpc_mode) {
        while (has_request()) {
            Connection *c = NULL;
            for (int tries = 0; tries < connection_count && !c; tries++) {
                Connection *candidate = &connections[round_robin++ % connection_count];
                if (usable(candidate)) c = candidate;
            }
            if (!c) break;
            long i = next_request();
            if (i < 0) break;
            records[i].sent = now_s();
            if (submit_call(c, i) < 0) {
                retry[retry_count++] = i;
                break;
            }
        }
        for (int k = 0; k < connection_count; k++)
            if (connections[k].session && connections[k].connected) flush_grpc(&connections[k]);
        return;
    }
    for (int k = 0; k < connection_count && has_request(); k++) {
        Connection *c = &connections[k];
        if (!usable(c) || c->in_flight >= 0) continue;
        long i = next_request();
        if (i < 0) break;
        c->in_flight = i;
        c->out_off = 0;
        records[i].sent = now_s();
        write_http(c);
    }
}

static size_t content_length(const char *head, size_t length) {
    for (size_t at = 0; at + 15 < length;) {
        const char *line = head + at;
        if (!strncasecmp(line, "content-length:", 15)) return strtoul(line + 15, NULL, 10);
        const char *eol = memchr(line, '\n', length - at);
        if (!eol) break;
        at = (size_t)(eol - head) + 1;
    }
    return 0;
}

static void read_http(Connection *c) {
    for (;;) {
        ssize_t n = read(c->fd, c->buffer + c->used, BUFFER_SIZE - c->used);
        if (n == 0 || (n < 0 && errno != EAGAIN)) {
            close_connection(c, "connection lost");
            return;
        }
        if (n < 0) return;
        c->used += (size_t)n;
        char *end = memmem(c->buffer, c->used, "\r\n\r\n", 4);
        if (!end && c->used == BUFFER_SIZE) {
            close_connection(c, "answer head larger than the read buffer");
            return;
        }
        if (!end) continue;
        size_t head = (size_t)(end - c->buffer) + 4, body = content_length(c->buffer, head);
        if (head + body > BUFFER_SIZE) {
            close_connection(c, "answer larger than the read buffer");
            return;
        }
        if (c->used < head + body) continue;
        int status = atoi(c->buffer + 9);
        int closing = memmem(c->buffer, head, "onnection: close", 16) != NULL;
        if (c->in_flight >= 0) {
            if (status == 200) finish(c->in_flight, status, "", 0);
            else finish(c->in_flight, status, c->buffer + head, body);
        }
        c->in_flight = -1;
        memmove(c->buffer, c->buffer + head + body, c->used - head - body);
        c->used -= head + body;
        if (closing) {
            closed_by_server++;
            close_connection(c, "connection lost");
        }
        return;
    }
}

static void on_event(Connection *c, unsigned events) {
    if (!c->connected) {
        int error = 0;
        socklen_t size = sizeof error;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &error, &size);
        if (error || (events & (EPOLLERR | EPOLLHUP))) {
            close_connection(c, "connection lost");
            return;
        }
        c->connected = 1;
        if (grpc_mode) flush_grpc(c);
        else watch(c, EPOLLIN, EPOLL_CTL_MOD);
        return;
    }
    if (grpc_mode) {
        if (events & EPOLLIN) {
            uint8_t data[BUFFER_SIZE];
            ssize_t n;
            while ((n = read(c->fd, data, sizeof data)) > 0) {
                if (nghttp2_session_mem_recv(c->session, data, (size_t)n) < 0) {
                    close_connection(c, "connection lost");
                    return;
                }
            }
            if (n == 0 || (n < 0 && errno != EAGAIN)) {
                close_connection(c, "connection lost");
                return;
            }
        }
        if (c->draining && c->in_flight == 0) close_connection(c, "");
        else flush_grpc(c);
        return;
    }
    if (events & EPOLLIN) read_http(c);
    if (c->fd >= 0 && (events & EPOLLOUT) && c->in_flight >= 0) write_http(c);
}

static void expire(double now) {
    static long oldest;  /* records below it are finished */
    for (; oldest < issued && records[oldest].due + TIMEOUT_S < now; oldest++)
        if (records[oldest].code == -2) finish(oldest, -1, "timeout", 7);
}

int main(int argc, char **argv) {
    if (argc < 8 || (strcmp(argv[1], "http") && strcmp(argv[1], "grpc")) || (!strcmp(argv[1], "grpc") && argc < 9)) {
        fprintf(stderr, "usage: openloop http|grpc HOST PORT RATE SECONDS CONNECTIONS REQUEST_FILE [GRPC_PATH]\n");
        return 2;
    }
    grpc_mode = !strcmp(argv[1], "grpc");
    host = argv[2];
    port = atoi(argv[3]);
    if (!strncmp(argv[4], "closed:", 7)) closed_n = atol(argv[4] + 7);
    double rate = closed_n ? 0 : atof(argv[4]), seconds = atof(argv[5]);
    connection_count = atoi(argv[6]);
    grpc_path = grpc_mode ? argv[8] : NULL;
    FILE *file = fopen(argv[7], "rb");
    if (!file || (rate <= 0 && closed_n <= 0) || seconds <= 0 || connection_count <= 0) {
        fprintf(stderr, "openloop: bad arguments or unreadable %s\n", argv[7]);
        return 2;
    }
    struct stat info;
    fstat(fileno(file), &info);
    request_size = (size_t)info.st_size;
    request = malloc(request_size + 1);
    if (fread(request, 1, request_size, file) != request_size) return 2;
    fclose(file);

    total = closed_n ? (long)(seconds * 200000) + closed_n : (long)(rate * seconds);  /* closed: room enough */
    records = calloc((size_t)total, sizeof *records);
    retry = calloc((size_t)total, sizeof *retry);
    connections = calloc((size_t)connection_count, sizeof *connections);
    epoll_fd = epoll_create1(0);
    for (int k = 0; k < connection_count; k++) {
        connections[k].fd = -1;
        connections[k].buffer = grpc_mode ? NULL : malloc(BUFFER_SIZE);
    }
    double start = now_s();
    for (long i = 0; i < total; i++) {
        records[i].due = closed_n ? 0 : start + i / rate;
        records[i].code = -2;
    }
    struct epoll_event events[256];
    long finished = 0, limit = total;  /* requests to wait for: all of them, or (closed loop) those issued */
    for (;;) {
        double now = now_s();
        int sending = closed_n ? now < start + seconds : issued < total;
        if (closed_n) {
            long target = completed + closed_n < total ? completed + closed_n : total;
            for (; sending && issued < target; issued++) records[issued].due = now;
            limit = issued;
        } else {
            long due = (long)((now - start) * rate) + 1;
            issued = due < total ? due : total;
        }
        expire(now);
        dispatch();
        while (finished < limit && records[finished].code != -2) finished++;
        if (!sending && finished == limit) {
            int all = 1;  /* later records may be done while an earlier one is still out */
            for (long i = 0; i < limit && all; i++) all = records[i].code != -2;
            if (all) break;
        }
        /* open loop: the next requests fall due within the millisecond, and go out together (late by up to 1 ms);
         * closed loop: an answer is followed at once, as the loop comes round before it waits again */
        int n = epoll_wait(epoll_fd, events, 256, sending ? 1 : 10);
        for (int k = 0; k < n; k++) {
            Connection *c = events[k].data.ptr;
            if (c->fd >= 0) on_event(c, events[k].events);
        }
    }
    fprintf(stderr, "openloop: %ld requests, %ld connections opened, %ld ended by the server (Connection: close or "
            "GOAWAY), %ld lost\n", limit, opened, closed_by_server, lost - closed_by_server);
    for (long i = 0; i < limit; i++) {
        Record *r = &records[i];
        printf("%.6f\t%.6f\t%.6f\t%d\t%s\n", r->due, r->sent ? r->sent : r->done, r->done, r->code, r->message);
    }
    return 0;
}
