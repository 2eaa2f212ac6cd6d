# frozen_string_literal: true

# Write a seeded random mix of Sidekiq jobs with Sidekiq's own Ruby client and API, and print a JSON summary.
#
#   REDIS_URL=redis://127.0.0.1:PORT/0 ruby sidekiq_seed_random.rb SEED QUEUES JOBS
#
# Jobs go to queues named q0..q(QUEUES-1). Most are pushed for immediate work. Some are scheduled and some
# put in the retry set, half of them due (at least 30 s in the past) and half in the future. The rest go to
# the dead set. Pushes are spread over a few hundred milliseconds so that queue latencies differ.
require "json"
require "sidekiq/api"

Redis.silence_deprecations = true if Redis.respond_to?(:silence_deprecations=)

seed, queue_count, job_count = ARGV.map { |argument| Integer(argument) }
abort "usage: sidekiq_seed_random.rb SEED QUEUES JOBS" if seed.nil? || queue_count.nil? || job_count.nil?

random = Random.new(seed)
queues = Array.new(queue_count) { |index| "q#{index}" }
summary = Hash.new(0)

def job(queue, random)
  { "class" => "FastJob", "queue" => queue, "args" => [random.rand(1000)], "retry" => 1 }
end

job_count.times do
  queue = queues[random.rand(queues.size)]
  kind = random.rand(100)
  now = Time.now.to_f
  if kind < 60
    Sidekiq::Client.push(job(queue, random))
    summary["queued"] += 1
  elsif kind < 75
    offset = random.rand(2).zero? ? -(30 + random.rand(600)) : 30 + random.rand(600)
    Sidekiq::Client.push(job(queue, random).merge("at" => now + offset))
    summary["scheduled"] += 1
  elsif kind < 90
    offset = random.rand(2).zero? ? -(30 + random.rand(600)) : 30 + random.rand(600)
    item = job(queue, random).merge(
      "jid" => format("%024x", random.rand(2**96)),
      "retry_count" => 0,
      "error_class" => "ArgumentError",
      "error_message" => "seeded failure",
      "failed_at" => now - 60,
      "enqueued_at" => now - 60
    )
    Sidekiq::RetrySet.new.schedule(now + offset, item)
    summary["retries"] += 1
  else
    item = job(queue, random).merge("jid" => format("%024x", random.rand(2**96)), "failed_at" => now)
    Sidekiq::DeadSet.new.kill(JSON.generate(item), notify_failure: false)
    summary["dead"] += 1
  end
  sleep(random.rand * 0.004) if random.rand(10).zero?
end

puts JSON.generate(summary)
