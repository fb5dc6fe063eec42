package server

import (
	"crypto/tls"
	"fmt"
	"net/http"
	"time"

	"blindperso/api"
)

// TLSConfig loads the server's certificate and key; with clientCA set,
// client certificates signed by it are verified when given (mTLS);
// clients without one can still use a bearer token.
func TLSConfig(certFile, keyFile, clientCA string) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("TLS certificate: %w", err)
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{cert}}
	if clientCA != "" {
		pool, err := api.LoadCertPool(clientCA)
		if err != nil {
			return nil, err
		}
		cfg.ClientCAs = pool
		cfg.ClientAuth = tls.VerifyClientCertIfGiven
	}
	return cfg, nil
}

// NewHTTP is an http.Server for h with the API's timeouts; writeTimeout
// bounds an upload and its import (0 means 15 minutes).
func NewHTTP(addr string, h http.Handler, tlsCfg *tls.Config, writeTimeout time.Duration) *http.Server {
	if writeTimeout <= 0 {
		writeTimeout = 15 * time.Minute
	}
	return &http.Server{
		Addr: addr, Handler: h, TLSConfig: tlsCfg,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       writeTimeout, // an upload of a large batch takes a while
		WriteTimeout:      writeTimeout, // the import runs before the response
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    16 << 10,
	}
}
