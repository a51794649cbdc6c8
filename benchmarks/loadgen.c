/* A closed-loop HTTP/1.1 load generator for benchmarks/server.py (built there with `cc`).

   N keep-alive connections, one request in flight on each, the next request written as
   soon as a response is complete. Unlike `wrk`, the warm-up runs on the same connections
   as the measurement and lasts until every connection has had an answer: under uvloop
   (libuv >= 1.45 accepts one connection per loop turn) the last of N connections opened
   at once into a busy server waits for about N turns, each turn serving every connection
   already accepted, so a measurement that opens its connections fresh starts with a ramp
   of up to seconds (quadratic in N), and wrk's correction for coordinated omission turns
   each of those first answers into one sample per expected interval: a few hundred slow
   first requests became the p99 at 256 connections. Latencies here are exact, one per
   response completed in the window, with no synthetic samples.

   usage: loadgen PORT CONNECTIONS WARMUP_S DURATION_S TIMEOUT_S "Header: value"...
   prints WINDOW when the measured window opens, then one line at its end:
   LOADGEN {"requests": ..., "duration_us": ..., "p50_us": ..., ...}
   (the keys of server.py's wrk summary, plus ramp_us and unserved)
   With LOADGEN_SPIN=1 in the environment it polls without sleeping (server_where.py): the
   server's writes then find it awake and wake no sleeping process on the other CPU. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { CONNECTING, WAITING, CLOSED };

typedef struct {
  int fd, state, answered;
  int64_t sent;
  int len;
  char buf[16384];
} conn_t;

static int64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int cmp_u32(const void *a, const void *b) {
  uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
  return (x > y) - (x < y);
}

static struct sockaddr_in addr;
static int ep;
static char request[4096];
static int request_len;
static long errors_connect, errors_read, errors_write;

static void open_conn(conn_t *c, int i) {
  c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  int one = 1;
  setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  c->state = CONNECTING;
  c->len = 0;
  if (c->fd < 0 || (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS)) {
    errors_connect++;
    if (c->fd >= 0) close(c->fd);
    c->state = CLOSED;
    return;
  }
  struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = (uint32_t)i};
  epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
}

static int send_request(conn_t *c) {
  c->sent = now_ns();
  return write(c->fd, request, request_len) == request_len;
}

int main(int argc, char **argv) {
  if (argc < 6) {
    fprintf(stderr, "usage: loadgen PORT CONNECTIONS WARMUP_S DURATION_S TIMEOUT_S [HEADER]...\n");
    return 2;
  }
  int port = atoi(argv[1]), n = atoi(argv[2]);
  double warmup = atof(argv[3]), duration = atof(argv[4]), timeout = atof(argv[5]);
  request_len = snprintf(request, sizeof request, "GET /hello HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n", port);
  for (int a = 6; a < argc; a++)
    request_len += snprintf(request + request_len, sizeof request - request_len, "%s\r\n", argv[a]);
  request_len += snprintf(request + request_len, sizeof request - request_len, "\r\n");

  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ep = epoll_create1(EPOLL_CLOEXEC);
  conn_t *cs = calloc(n, sizeof *cs);
  size_t cap = 1 << 20, count = 0;
  uint32_t *lat = malloc(cap * sizeof *lat);
  long non2xx = 0, answered = 0;
  int64_t t0 = now_ns(), ramp = -1, start = -1, end = -1;
  /* the window opens after the warm-up and once every connection has had an answer
     (at most `timeout` past the warm-up: connections still unanswered are reported) */
  int64_t warm_end = t0 + (int64_t)(warmup * 1e9), give_up = warm_end + (int64_t)(timeout * 1e9);
  for (int i = 0; i < n; i++) open_conn(&cs[i], i);

  struct epoll_event evs[1024];
  const char *spin = getenv("LOADGEN_SPIN");
  int poll_ms = spin && *spin && *spin != '0' ? 0 : 5;
  for (;;) {
    int64_t t = now_ns();
    if (start < 0 && t >= warm_end && (answered == n || t >= give_up)) {
      start = t;
      end = start + (int64_t)(duration * 1e9);
      printf("WINDOW\n");  /* the caller's cue to read the server's CPU counters */
      fflush(stdout);
    }
    if (end >= 0 && t >= end) break;
    int k = epoll_wait(ep, evs, 1024, poll_ms);
    for (int j = 0; j < k; j++) {
      int i = (int)evs[j].data.u32;
      conn_t *c = &cs[i];
      if (c->state == CONNECTING) {
        int err = 0;
        socklen_t el = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
        if (err) {
          errors_connect++;
          epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
          close(c->fd);
          open_conn(c, i);
          continue;
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
        c->state = WAITING;
        if (!send_request(c)) errors_write++;
        continue;
      }
      if (c->state != WAITING) continue;
      for (;;) {
        ssize_t r = read(c->fd, c->buf + c->len, sizeof c->buf - 1 - c->len);
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        if (r <= 0) {  /* closed or failed: count it and reconnect, as wrk does */
          errors_read++;
          epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
          close(c->fd);
          open_conn(c, i);
          break;
        }
        c->len += (int)r;
        c->buf[c->len] = 0;
        for (;;) {
          char *head_end = memmem(c->buf, c->len, "\r\n\r\n", 4);
          if (!head_end) break;
          *head_end = 0;
          int head = (int)(head_end - c->buf) + 4;
          long body = 0;
          char *cl = strcasestr(c->buf, "\r\ncontent-length:");
          if (cl) body = strtol(cl + 17, NULL, 10);
          *head_end = '\r';
          if (c->len < head + body) break;
          int64_t done = now_ns();
          int status = atoi(c->buf + 9);
          if (!c->answered) {
            c->answered = 1;
            if (++answered == n) ramp = done - t0;
          }
          if (start >= 0 && done >= start) {
            if (status < 200 || status > 299) non2xx++;
            if (count == cap) lat = realloc(lat, (cap *= 2) * sizeof *lat);
            int64_t us = (done - c->sent) / 1000;
            lat[count++] = us > UINT32_MAX ? UINT32_MAX : (uint32_t)us;
          }
          memmove(c->buf, c->buf + head + body, c->len - head - body);
          c->len -= head + body;
          c->buf[c->len] = 0;
          if (!send_request(c)) errors_write++;
        }
      }
    }
  }
  int64_t stop = now_ns();
  long timeouts = 0;
  for (int i = 0; i < n; i++)
    if (cs[i].state == WAITING && stop - cs[i].sent > (int64_t)(timeout * 1e9)) timeouts++;
  qsort(lat, count, sizeof *lat, cmp_u32);
#define PCT(p) (count ? lat[(size_t)((count - 1) * (p) / 100.0 + 0.5)] : 0)
  printf("LOADGEN {\"requests\": %zu, \"duration_us\": %lld, \"connect\": %ld, \"read\": %ld, "
         "\"write\": %ld, \"status\": %ld, \"timeout\": %ld, \"p50_us\": %u, \"p99_us\": %u, "
         "\"max_us\": %u, \"ramp_us\": %lld, \"unserved\": %ld}\n",
         count, (long long)((stop - start) / 1000), errors_connect, errors_read, errors_write, non2xx,
         timeouts, PCT(50), PCT(99), count ? lat[count - 1] : 0,
         (long long)(ramp < 0 ? -1 : ramp / 1000), (long)(n - answered));
  return 0;
}
