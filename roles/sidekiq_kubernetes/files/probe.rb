# Health probe of a Sidekiq pod: `ruby probe.rb ready` or `ruby probe.rb live`, run by the kubelet.
#
# Sidekiq (6.x to 8.x) adds its identity "<hostname>:<pid>:<nonce>" to the Redis set "processes" and refreshes the
# field "beat" (epoch seconds) of the hash "<identity>" every 5 to 10 seconds. Inside a pod the hostname is the pod's
# name, so this probe looks for the freshest beat among the identities that start with "<hostname>:".
#
# ready: exits 0 when a beat is younger than SIDEKIQ_PROBE_READY_MAX_AGE seconds; 1 otherwise, and 1 when Redis
#        cannot be reached (the process cannot fetch jobs then).
# live:  exits 1 only when Redis is reachable and no beat is younger than SIDEKIQ_PROBE_LIVE_MAX_AGE seconds (a hung or
#        dead heartbeat thread). It exits 0 when Redis cannot be reached, because restarting the pod cannot fix
#        Redis and would cut its running jobs short.
require "redis"
require "socket"

mode = ARGV.fetch(0, "")
unless %w[ready live].include?(mode)
  warn "usage: ruby probe.rb ready|live"
  exit 2
end
max_age = Float(ENV.fetch(mode == "live" ? "SIDEKIQ_PROBE_LIVE_MAX_AGE" : "SIDEKIQ_PROBE_READY_MAX_AGE"))
Redis.silence_deprecations = true if Redis.respond_to?(:silence_deprecations=)
hostname = ENV["DYNO"] || Socket.gethostname

begin
  redis = Redis.new(url: ENV.fetch("REDIS_URL"), connect_timeout: 2, read_timeout: 2, write_timeout: 2)
  identities = redis.smembers("processes").select { |identity| identity.start_with?("#{hostname}:") }
  beats = identities.map { |identity| redis.hget(identity, "beat") }.compact.map(&:to_f)
rescue Redis::BaseError, SystemCallError, SocketError => error
  warn "#{mode}: Redis cannot be reached: #{error.class}: #{error.message}"
  exit(mode == "live" ? 0 : 1)
end

if beats.empty?
  warn "#{mode}: no Sidekiq heartbeat for host #{hostname} in Redis"
  exit 1
end
age = Time.now.to_f - beats.max
if age > max_age
  warn "#{mode}: the last Sidekiq heartbeat of host #{hostname} is #{age.round(1)} s old, more than #{max_age} s"
  exit 1
end
exit 0
