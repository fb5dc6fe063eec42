package api

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
)

// Error is the body of every answer that is not 200, and the error the
// Client returns for one. Status is the HTTP status (not in the body).
type Error struct {
	Status int    `json:"-"`
	Title  string `json:"error"`
	Detail string `json:"detail,omitempty"`
}

func (e *Error) Error() string {
	s := fmt.Sprintf("issuer answered %d %s", e.Status, http.StatusText(e.Status))
	if e.Title != "" && !strings.EqualFold(e.Title, http.StatusText(e.Status)) {
		s += ": " + e.Title
	}
	if e.Detail != "" {
		s += ": " + e.Detail
	}
	return s
}

// What an answer's status means, for errors.Is on a Client's error.
var (
	ErrUnauthorized = errors.New("the issuer does not know this credential")    // 401
	ErrForbidden    = errors.New("the credential's role may not do this")       // 403
	ErrNotFound     = errors.New("no such card or batch at the issuer")         // 404
	ErrConflict     = errors.New("the card's state does not allow this")        // 409: not active, or not blocked
	ErrTooLarge     = errors.New("the request is over the issuer's limit")      // 413
	ErrRefused      = errors.New("the batch was refused as a whole")            // 422
	ErrBadRequest   = errors.New("the issuer could not understand the request") // 400
)

var statusErrors = map[int]error{
	http.StatusBadRequest:            ErrBadRequest,
	http.StatusUnauthorized:          ErrUnauthorized,
	http.StatusForbidden:             ErrForbidden,
	http.StatusNotFound:              ErrNotFound,
	http.StatusConflict:              ErrConflict,
	http.StatusRequestEntityTooLarge: ErrTooLarge,
	http.StatusUnprocessableEntity:   ErrRefused,
}

// Is makes errors.Is(err, ErrConflict) and the like true for an answer
// of that status.
func (e *Error) Is(target error) bool {
	s, ok := statusErrors[e.Status]
	return ok && s == target
}
