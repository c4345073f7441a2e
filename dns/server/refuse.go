package server

import (
	"sync"
	"time"

	"github.com/miekg/dns"
)

// Refusals (REFUSED, NOTAUTH, unsigned LLQs, TSIG failures) are logged with
// their reason at Info, rate-limited so that a flood of bad requests cannot
// flood the log: refuseBurst lines at once, refuseRate per second after that,
// and a count of the lines left out when logging resumes.
const (
	refuseRate  = 5.0
	refuseBurst = 20
)

type refuseLimiter struct {
	mu      sync.Mutex
	tokens  float64
	last    time.Time
	dropped int
}

// allow reports whether a line may be logged now and how many were
// suppressed since the last one.
func (l *refuseLimiter) allow(now time.Time) (bool, int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.last.IsZero() {
		l.tokens, l.last = refuseBurst, now
	}
	l.tokens = min(refuseBurst, l.tokens+now.Sub(l.last).Seconds()*refuseRate)
	l.last = now
	if l.tokens < 1 {
		l.dropped++
		return false, 0
	}
	l.tokens--
	d := l.dropped
	l.dropped = 0
	return true, d
}

// refusedLog logs a refused request of kind ("query", "llq", "update",
// "tsig") from w's peer with attrs (which must include "reason").
func (s *Server) refusedLog(kind string, w dns.ResponseWriter, attrs ...any) {
	ok, dropped := s.refuse.allow(s.cfg.Now())
	if !ok {
		return
	}
	args := append([]any{"from", w.RemoteAddr().String()}, attrs...)
	if dropped > 0 {
		args = append(args, "not_logged_before", dropped)
	}
	s.log.Info(kind+" refused", args...)
}

// fudge is the fudge of the server's own signatures (whole seconds).
func (s *Server) fudge() uint16 {
	return uint16(min(time.Duration(s.cfg.TSIGFudge)/time.Second, 0xffff))
}
